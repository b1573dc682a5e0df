"""The loop on a cluster started the way users start one: a scheduler and workers from Dask's own CLI, each in a
working directory of its own (not the repository's), an S3 store on a moto server, `ram-engine` as a command.
And a run never hangs: a worker killed mid-part, a worker that cannot import the engine, a cluster left with no
worker, a part over its time limit, SIGTERM.

The workers run with this test's environment (its PYTHONPATH, its venv). `test_parts_import_under_each_install`
installs the project into venvs of its own, as the README (editable) and the images (non-editable) do, and as an
editable install through setuptools' import hook (what `pip install -e .` made before): there the workers find
Dask's spill folder `storage/` first on their path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures import demo_overrides, image_bytes, write_folder_source

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason="the dask extra is not installed: pip install 'ram-data-engine[dask]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str, python: str = sys.executable) -> list[str]:
    """A console script of `python`'s environment, as a user types it (`dask`, `ram-engine`)."""
    exe = Path(python).parent / name
    if exe.exists():
        return [str(exe)]
    return [python, "-m", {"dask": "dask", "ram-engine": "flows.cli"}[name]]


def quiet_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAM_ENGINE_LOG="INFO",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.update({k: v for k, v in extra.items() if v is not None})
    for k in [k for k, v in extra.items() if v is None]:
        env.pop(k, None)
    return env


@dataclass
class CliCluster:
    """`dask scheduler` and `dask worker` processes (each its own process group), started in `folder`."""

    address: str
    folder: Path
    python: str
    env: dict
    procs: list = field(default_factory=list)

    def add_workers(self, n: int = 2, *extra: str, env: dict | None = None) -> subprocess.Popen:
        cmd = console_script("dask", self.python) + ["worker", self.address, "--nworkers", str(n), "--nthreads", "1",
                                                     "--no-dashboard", *extra]
        log = open(self.folder / f"worker-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(cmd, cwd=self.folder, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def client(self):
        from distributed import Client

        return Client(self.address, timeout=60, set_as_default=False)

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start_cluster(folder: Path, workers: int = 2, python: str = sys.executable, env: dict | None = None,
                  worker_args: tuple = ()) -> CliCluster:
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = env or quiet_env()
    cluster = CliCluster(f"tcp://127.0.0.1:{port}", folder, python, env)
    log = open(folder / "scheduler.log", "w")
    cluster.procs.append(subprocess.Popen(console_script("dask", python) + [
        "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        if workers:
            cluster.add_workers(workers, *worker_args)
            cluster.wait_for_workers(workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def ram_engine(args: list[str], *, cwd: Path, env: dict, python: str = sys.executable, timeout: float = 600,
               ) -> subprocess.CompletedProcess:
    return subprocess.run(console_script("ram-engine", python) + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def small_source(root: Path, n: int = 12) -> Path:
    items = {f"img{i:03d}.jpg": (image_bytes(size=(32 + i, 24 + i % 5), color=(i * 20 % 256, 60, 180)),
                                 f"a small picture number {i}") for i in range(n)}
    return write_folder_source(root, items)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def written_parts(stdout: str) -> int:
    found = re.search(r"written: (\d+) parts? written", stdout)
    return int(found.group(1)) if found else 0


def verified(result: subprocess.CompletedProcess) -> list[str]:
    lines = [l for l in result.stdout.splitlines() if "files match their checksums" in l]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    return lines


# ------------------------------------------------------------------------------------------ fast: import resolution
def test_engine_packages_win_over_folders_and_real_shadows_are_named(tmp_path):
    """What a Dask worker saw under `pip install -e .` through setuptools' import hook: its local directory first
    on sys.path, holding the spill folder `storage/`, and the hook asked only after sys.path. The worker plugin's
    function makes the folder lose; a real package of the same name is named instead of overridden."""
    workdir = tmp_path / "worker-dir"
    (workdir / "storage").mkdir(parents=True)          # Dask's spill folder: no __init__.py
    shadow = tmp_path / "user-project"
    (shadow / "tasks").mkdir(parents=True)
    (shadow / "tasks" / "__init__.py").write_text("")  # a user's own package named tasks
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        from importlib.machinery import PathFinder
        root = {str(ROOT)!r}
        sys.path[:] = [p for p in sys.path if p not in ("", root) and not p.endswith("{ROOT.name}")]
        for name in [m for m in sys.modules if m.split(".")[0] in ("flows", "tasks", "storage", "ram_model", "configs")]:
            del sys.modules[name]
        class Hook:  # setuptools' editable finder: appended after the path finder
            @staticmethod
            def find_spec(name, path=None, target=None):
                if name in ("flows", "tasks", "storage", "ram_model", "configs"):
                    return PathFinder.find_spec(name, [root])
        # only this hook knows the engine (an editable install of another checkout has a hook of its own)
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        sys.meta_path.append(Hook)
        sys.path.insert(0, {str(workdir)!r})
        before = importlib.util.find_spec("storage").origin
        spec = importlib.util.spec_from_file_location("engine_imports", root + "/flows/engine_imports.py")
        ei = importlib.util.module_from_spec(spec); spec.loader.exec_module(ei)
        redirected = ei.prefer_engine_packages()
        from storage import PartRecord
        ok = ei.import_problems()
        sys.path.insert(0, {str(shadow)!r})
        shadowed = ei.import_problems()
        print(json.dumps({{"before": before, "redirected": redirected, "ok": ok, "shadowed": shadowed,
                          "storage": sys.modules["storage"].__file__}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=quiet_env(PYTHONPATH=None))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["before"] is None, "the spill folder must shadow storage under an import-hook install (the bug)"
    assert out["redirected"] == ["storage"]
    assert out["storage"] == str(ROOT / "storage" / "__init__.py")
    assert out["ok"] == []
    assert len(out["shadowed"]) == 1 and str(shadow / "tasks") in out["shadowed"][0], out["shadowed"]


def test_cluster_limits_are_config_fields():
    from flows.runners import make_task_runner
    from tasks.engine.config import ConfigError, load_config

    runner = make_task_runner(load_config(None, ["orchestration.task_runner=dask", "orchestration.dask_address=tcp://x:1",
                                                 "orchestration.part_timeout_s=90",
                                                 "orchestration.cluster_timeout_s=15"]))
    assert type(runner).__name__ == "ClusterTaskRunner"
    assert (runner.part_timeout_s, runner.cluster_timeout_s, runner.client_kwargs["timeout"]) == (90, 15, 15)
    assert runner.duplicate().part_timeout_s == 90
    with pytest.raises(ConfigError, match="orchestration.part_timeout_s"):
        load_config(None, ["orchestration.part_timeout_s=0"])


# ------------------------------------------------------------------------------------------ slow: real clusters
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A smaller demo-like world than the session's (12 images in 3 tars: 3 parts per stage), its detector."""
    from tests.fixtures import DEMO_WORLD, DemoWorld
    from ram_model.detector import build_tiny_detector
    from tasks.demo.world import generate_world

    root = tmp_path_factory.mktemp("cluster-world")
    info = generate_world(root / "world", 12, seed=5, fmt="webdataset", samples_per_shard=4,
                          captions_per_image=DEMO_WORLD["captions_per_image"])
    categories = json.loads(Path(info.tag_groups).read_text())["category"]
    build_tiny_detector(categories, seed=0, image_size=128).save(root / "detector")
    return DemoWorld(info, root / "detector")


@pytest.mark.slow
@pytest.mark.s3
def test_the_loop_on_a_cli_started_dask_cluster_over_s3(world, prefect_api, s3_store_url, tmp_path):
    url, options = s3_store_url
    cluster = start_cluster(tmp_path / "cluster")
    try:
        overrides = demo_overrides(world, url, **{"ingest.part_size": 4, "train.holdout_fraction": 0.25}) + [
            f"store.storage_options={json.dumps(options)}", "orchestration.task_runner=dask",
            f"orchestration.dask_address={cluster.address}", "orchestration.cluster_timeout_s=60",
            "orchestration.part_timeout_s=300"]
        env = quiet_env(PREFECT_API_URL=prefect_api[0], RAM_ENGINE_CACHE=str(tmp_path / "cache"))
        user = tmp_path / "user"
        user.mkdir()
        t0 = time.monotonic()
        run = ram_engine(sets(overrides) + ["run"], cwd=user, env=env)
        took = time.monotonic() - t0
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:] + cluster.logs()
        print(f"the loop on the CLI-started cluster: {took:.0f} s")
        assert "Connecting to an existing Dask cluster" in run.stderr
        for stage in ("images", "parsed", "generated", "regions", "embeddings", "clean", "evaluate"):
            assert re.search(rf"\b{stage}\b", run.stdout), f"{stage} missing from the summary:\n{run.stdout}"
        lines = verified(ram_engine(sets(overrides) + ["verify"], cwd=user, env=env))
        assert len(lines) >= 8, lines
        with cluster.client() as client:  # the parts ran on the CLI's workers, which are all still there
            assert len(client.scheduler_info()["workers"]) == 2
    finally:
        cluster.stop()


def _ingest_args(tmp_path: Path, cluster: CliCluster, **extra) -> list[str]:
    src = small_source(tmp_path / "src")
    overrides = [f"ingest.source={src}", "ingest.part_size=3", f"store.url={tmp_path / 'store'}",
                 "orchestration.task_runner=dask", f"orchestration.dask_address={cluster.address}"]
    return sets(overrides + [f"orchestration.{k}={v}" for k, v in extra.items()]) + ["ingest"]


def _worker_pid(client, worker: str) -> int:
    return client.run(os.getpid, workers=[worker])[worker]


@pytest.mark.slow
def test_a_worker_killed_mid_part_is_retried_on_another(prefect_api, tmp_path):
    cluster = start_cluster(tmp_path / "cluster")
    try:
        env = quiet_env(PREFECT_API_URL=prefect_api[0])
        run = subprocess.Popen(console_script("ram-engine") + _ingest_args(tmp_path, cluster, cluster_timeout_s=60),
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with cluster.client() as client:
            def running_part():
                return next(((w, k) for w, keys in client.processing().items() for k in keys
                             if str(k).startswith("run_part")), None)

            worker, key = wait_until(running_part, 240, "a part running on a worker", poll=0.05)
            os.kill(_worker_pid(client, worker), signal.SIGKILL)
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, out + err[-5000:] + cluster.logs()
        assert re.search(rf"part part-\S+: worker {re.escape(worker)} died while running it; Dask runs it again", err), err
        assert written_parts(out) > 1, out
        verified(ram_engine(["--store", str(tmp_path / "store"), "verify"], cwd=tmp_path, env=env))
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_worker_that_cannot_import_the_engine_stops_the_run_at_start(prefect_api, tmp_path):
    """A user's own package named like one of ours (`storage/` with an __init__.py) on the workers' path."""
    project = tmp_path / "their-project"
    (project / "storage").mkdir(parents=True)
    (project / "storage" / "__init__.py").write_text("# someone else's storage package\n")
    worker_env = quiet_env(PYTHONPATH=os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cluster = start_cluster(tmp_path / "cluster", workers=0)
    try:
        cluster.add_workers(2, env=worker_env)
        cluster.wait_for_workers(2)
        t0 = time.monotonic()
        run = ram_engine(_ingest_args(tmp_path, cluster), cwd=tmp_path, env=quiet_env(PREFECT_API_URL=prefect_api[0]),
                         timeout=300)
        took = time.monotonic() - t0
        assert run.returncode != 0, run.stdout
        line = next(l for l in run.stderr.splitlines() if l.startswith("error:"))
        assert "worker tcp://127.0.0.1:" in line and f"storage resolves to {project / 'storage'}" in line, run.stderr
        assert "parts" not in line
        assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("_manifest.json"))
        print(f"stopped at start in {took:.1f} s: {line}")
    finally:
        cluster.stop()


@pytest.mark.slow
def test_a_run_stops_when_its_cluster_is_gone_and_sigterm_is_prompt(prefect_api, tmp_path):
    """One worker without a nanny (nothing restarts it), killed while it runs a part: the run stops after
    `cluster_timeout_s` naming the part and the worker. The scheduler killed instead: the same, naming the
    scheduler. The worker killed with a long timeout, and the run ended by SIGTERM: promptly."""
    env = quiet_env(PREFECT_API_URL=prefect_api[0])
    for case, timeout_s in (("no worker", 8), ("scheduler gone", 8), ("sigterm", 600)):
        cluster = start_cluster(tmp_path / case / "cluster", workers=1, worker_args=("--no-nanny",))
        run = subprocess.Popen(console_script("ram-engine") + _ingest_args(tmp_path / case, cluster,
                                                                           cluster_timeout_s=timeout_s),
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with cluster.client() as client:
                worker = wait_until(lambda: next((w for w, keys in client.processing().items() if keys), None), 240,
                                    "a part running on the worker", poll=0.05)
            os.killpg(cluster.procs[0 if case == "scheduler gone" else -1].pid, signal.SIGKILL)
            t0 = time.monotonic()
            if case == "sigterm":
                time.sleep(3)
                t0 = time.monotonic()
                run.send_signal(signal.SIGTERM)
            out, err = run.communicate(timeout=180)
            took = time.monotonic() - t0
            assert run.returncode != 0, out
            if case == "sigterm":
                assert took < 30, f"SIGTERM took {took:.1f} s to end the run"
            else:
                line = next((l for l in err.splitlines() if l.startswith("error:")), None)
                assert line and re.search(r"images: part part-\S+", line), err[-5000:]
                if case == "no worker":
                    assert f"(last on worker {worker}): no Dask worker at {cluster.address}" in line, line
                else:
                    assert f"scheduler at {cluster.address}" in line, line
                assert took < timeout_s + 60, took
            print(f"{case}: ended {took:.1f} s after {'SIGTERM' if case == 'sigterm' else 'the kill'}")
        finally:
            if run.poll() is None:
                run.kill()
            cluster.stop()


@pytest.mark.slow
def test_a_part_over_its_time_limit_stops_the_run(prefect_api, tmp_path):
    from prefect import flow

    from flows.cluster import ClusterError
    from flows.runners import with_task_runner
    from flows.runtime import prefect_executor
    from tasks.engine.config import load_config
    from tasks.engine.runner import PartTask

    cluster = start_cluster(tmp_path / "cluster", workers=1)
    release = tmp_path / "release"
    try:
        cfg = load_config(None, ["orchestration.task_runner=dask", f"orchestration.dask_address={cluster.address}",
                                 "orchestration.part_timeout_s=3"])

        @flow
        def slow_stage(release: str):
            def part(task):
                deadline = time.monotonic() + 60
                while not os.path.exists(release) and time.monotonic() < deadline:
                    time.sleep(0.1)
                return task.name
            return list(prefect_executor("slow")(part, [PartTask("p0", "d0"), PartTask("p1", "d1")]))

        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"slow: part p[01] on worker tcp://\S+ ran for \d+ s, over "
                                               r"orchestration.part_timeout_s \(3 s\)"):
            with_task_runner(slow_stage, cfg)(str(release))
        assert time.monotonic() - t0 < 60
    finally:
        release.write_text("")
        cluster.stop()


# ------------------------------------------------------------------------------------------ slow: install modes
def _venv(path: Path, src: Path, mode: str) -> str:
    """A venv that shares this environment's packages (a .pth line: no download) with the project installed from
    `src` as `mode` says. Returns its python."""
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = str(path / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    shared = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) if Path(p).is_dir()]
    Path(purelib, "_shared_test_env.pth").write_text("\n".join(shared) + "\n")
    cmd = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation",
           "--no-index"] + (["-e"] if mode != "wheel" else []) + [str(src)]
    install = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=quiet_env(PYTHONPATH=None))
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def _source_copy(dst: Path, import_hook: bool) -> Path:
    for name in ("flows", "tasks", "storage", "ram_model", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", dst / "README.md")
    text = (ROOT / "pyproject.toml").read_text()
    if import_hook:  # what `pip install -e .` made before: setuptools' import hook, asked after sys.path
        text = re.sub(r"\[tool\.setuptools\]\npackage-dir = .*\n", "", text)
        assert not re.search(r"^package-dir", text, re.M)
    (dst / "pyproject.toml").write_text(text)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["editable", "wheel", "editable-import-hook"])
def test_parts_import_under_each_install(mode, prefect_api, tmp_path):
    """The README's `pip install -e .`, the images' `pip install .`, and an older editable install (import hook):
    ingest's parts import `storage` on CLI-started workers whose path starts with Dask's spill folder."""
    src = _source_copy(tmp_path / "src", import_hook=mode == "editable-import-hook")
    python = _venv(tmp_path / "venv", src, "wheel" if mode == "wheel" else "editable")
    site_packages = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    hooks = list(site_packages.glob("__editable___*finder.py"))
    assert bool(hooks) == (mode == "editable-import-hook"), sorted(p.name for p in site_packages.iterdir())
    env = quiet_env(PYTHONPATH=None, PREFECT_API_URL=prefect_api[0])
    cluster = start_cluster(tmp_path / "cluster", workers=2, python=python, env=env)
    try:
        with cluster.client() as client:  # the workers' first path entry is their own folder, spill folder inside
            spill = client.run(lambda: (__import__("sys").path[0], sorted(__import__("os").listdir(__import__("sys").path[0]))))
        assert all("storage" in listing for _, listing in spill.values()), spill
        run = ram_engine(_ingest_args(tmp_path, cluster), cwd=tmp_path, env=env, python=python, timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr[-5000:] + cluster.logs()
        assert written_parts(run.stdout) > 1, run.stdout
        with cluster.client() as client:
            where = client.run(lambda: __import__("storage").__file__)
        expected = str(src / "storage") if mode != "wheel" else str(site_packages / "storage")
        assert all(w.startswith(expected) for w in where.values()), where
    finally:
        cluster.stop()


# ------------------------------------------------------------------------------------------ slow: Ray
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is None or shutil.which("ray") is None,
                    reason="prefect-ray is the optional extra (pip install 'ram-data-engine[ray]'): no Ray CLI here")
def test_ingest_on_a_cli_started_ray_cluster(prefect_api, tmp_path):
    """`ray start --head` and a second node started by hand, in a folder of their own; ingest on them."""
    port, client_port = _free_port(), _free_port()
    folder = tmp_path / "ray"
    folder.mkdir()
    env = quiet_env(PREFECT_API_URL=prefect_api[0], RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus", "1", "--block", "--temp-dir", str(folder / "tmp")]
    nodes = []
    try:  # --block keeps each node in the foreground, in a process group of its own: stopped by its id below
        nodes.append(subprocess.Popen(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                       "--ray-client-server-port", str(client_port), "--include-dashboard", "false",
                                       "--disable-usage-stats"] + common, cwd=folder, env=env, start_new_session=True))
        time.sleep(10)
        nodes.append(subprocess.Popen(["ray", "start", "--address", f"127.0.0.1:{port}"] + common, cwd=folder, env=env,
                                      start_new_session=True))
        src = small_source(tmp_path / "src")
        overrides = [f"ingest.source={src}", "ingest.part_size=3", f"store.url={tmp_path / 'store'}",
                     "orchestration.task_runner=ray", f"orchestration.ray_address=ray://127.0.0.1:{client_port}"]
        run = ram_engine(sets(overrides) + ["ingest"], cwd=tmp_path, env=env, timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr[-5000:]
        assert written_parts(run.stdout) > 1, run.stdout
        verified(ram_engine(["--store", str(tmp_path / "store"), "verify"], cwd=tmp_path, env=env))
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(node.pid, signal.SIGKILL)
