"""docker/: the compose file is valid, and what the images run and copy exists in the repository."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_file_is_valid():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install -y docker-compose); "
                    "cannot validate docker/compose.yaml")
    run = subprocess.run([binary, "-f", str(DOCKER / "compose.yaml"), "config", "-q"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, f"docker-compose rejects docker/compose.yaml:\n{run.stderr}"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_and_enters_ram_engine(dockerfile):
    steps = instructions(dockerfile)
    copies = [args for word, args in steps if word in ("COPY", "ADD")]
    assert copies, f"{dockerfile.name} copies nothing"
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        assert "--from" not in args, "multi-stage copies are not checked here"
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} but {src} is not in the repository"
            ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
            allowed = [l[1:].rstrip("/") for l in ignore.read_text().splitlines() if l.startswith("!")]
            assert src.rstrip("/") in allowed, f"{ignore.name} excludes {src}, which {dockerfile.name} copies"
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["ram-engine"]
    # The CPU build of torch comes first, pinned, from the index the image is for.
    pip_torch = next(args for word, args in steps if word == "RUN" and "torch==" in args)
    assert "torch==2.13.0" in pip_torch and "--index-url" in pip_torch
    assert "torchvision" not in dockerfile.read_text()


def test_ram_engine_console_script_exists():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("ram-engine") == "flows.cli:main"
    from flows import cli

    assert callable(cli.main)


def cli_commands() -> set[str]:
    import typer.main

    from flows.cli import app

    return set(typer.main.get_command(app).commands)


def engine_invocations(service: dict) -> list[list[str]]:
    """The `ram-engine` argument lists a service runs: its command under the image's entrypoint, or each
    `ram-engine …` of an `sh -c` script (e.g. `check && exec … serve`)."""
    import shlex

    if service.get("entrypoint") in (["sh", "-c"], ["/bin/sh", "-c"]):
        runs = []
        for part in " ".join(service["command"]).split("&&"):
            words = shlex.split(part)
            words = words[1:] if words and words[0] == "exec" else words
            assert words and words[0] == "ram-engine", f"the script runs {part!r}, not ram-engine"
            runs.append(words[1:])
        return runs
    return [list(service["command"])]


def test_compose_services_call_existing_cli_commands_and_configs():
    from tasks.engine.config import load_config

    services = compose()["services"]
    ours = {name: s for name, s in services.items() if "build" in s and s.get("entrypoint") != ["dask"]}
    assert ours, "no service runs the engine image"
    for name, service in ours.items():
        assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).resolve().exists()
        for command in engine_invocations(service):
            words, i = [], 0
            while i < len(command):  # the first word that is not a global option or its value is the command
                if command[i] in ("--config", "-c", "--set", "-s", "--store", "--engine"):
                    i += 2
                else:
                    words.append(command[i])
                    i += 1
            assert words and words[0] in cli_commands(), (
                f"compose service {name} runs `ram-engine {words[0] if words else ''}`, which flows.cli does not "
                f"define (commands: {sorted(cli_commands())})")
            option = next((o for o in ("--config", "-c") if o in command), None)
            if option:
                given = command[command.index(option) + 1]
                # a shipped config's name, or its path in the image
                cfg = load_config(ROOT / given.removeprefix("/app/") if given.startswith("/app/") else given)
                assert cfg.store.url.startswith("s3://")
                endpoint = cfg.store.storage_options["client_kwargs"]["endpoint_url"]
                assert endpoint.split("//")[1].split(":")[0] in services, f"{endpoint} is not a compose service"
        env = service["environment"]
        assert env["PREFECT_API_URL"].startswith("http://prefect-server:")
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_compose_wires_server_store_and_bucket():
    services = compose()["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "worker"} <= set(services)
    assert "postgres:5432" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["minio-init"]["image"].startswith("minio/mc")
    from tasks.engine.config import load_config

    bucket = load_config(ROOT / "configs" / "production.yaml").store.url.split("/")[2]
    assert f"local/{bucket}" in " ".join(services["minio-init"]["entrypoint"])
    assert services["worker"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_runs_the_parts_on_scalable_dask_workers_from_the_engine_image():
    """The served runs send parts to the compose file's Dask scheduler; its workers run the engine's image, and
    `--scale dask-worker=N` can add workers (no fixed name or host port)."""
    services = compose()["services"]
    scheduler, workers, engine = services["dask-scheduler"], services["dask-worker"], services["worker"]
    for dask in (scheduler, workers):
        assert dask["image"] == engine["image"] and dask["build"] == engine["build"] and dask["entrypoint"] == ["dask"]
    port = scheduler["command"][scheduler["command"].index("--port") + 1]
    address = f"tcp://dask-scheduler:{port}"
    assert workers["command"][:2] == ["worker", address] and "--nthreads" in workers["command"]
    assert "container_name" not in workers and "ports" not in workers
    for run in engine_invocations(engine):
        assert f"orchestration.dask_address={address}" in run and "orchestration.task_runner=dask" in run, run
    assert engine["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL"} <= set(workers["environment"])
