"""Orchestration overhead: the whole demo loop with `--engine local` (the baseline: stage code inline, no
Prefect) and under Prefect against a server that is already running, in one process; plus what a cold
start costs (no PREFECT_API_URL: Prefect starts a temporary server for the run).

Both loops run the same world and config into fresh stores, so both do all the work. The LAST line is the
Prefect loop's wall time over the local loop's (goal: <= 1.10).

    python benchmarks/orchestration.py [--images 200] [--baseline-steps 300] [--train-steps 100]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` on loopback; returns the process, its API URL and the seconds to healthy."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    for _ in range(600):
        try:
            with urllib.request.urlopen(api + "/health", timeout=2):
                return proc, api, time.perf_counter() - t
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("prefect server exited while starting")
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("prefect server did not become healthy in 5 minutes")


def drain_prefect(timeout_s: float = 30) -> None:
    """Send what Prefect still holds for the API (log lines batched every few seconds, events) while the server
    runs. Stopping the server first made Prefect's exit flush fail with `--- Error logging to API --- All connection
    attempts failed`, and those log lines of the run were lost."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception as exc:  # nothing to drain in this process, or a worker that already stopped
            print(f"(draining {worker.__name__}: {type(exc).__name__}: {exc})", file=sys.stderr)


def stop_server(proc: subprocess.Popen) -> None:
    """Drain this process's Prefect logs and events into the server, then stop it."""
    drain_prefect()
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cold_start_seconds(home: Path) -> float:
    """A trivial flow with no API URL: Prefect's temporary server start-up and shutdown."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # as the CLI sets it: a busy machine is slow
    env.pop("PREFECT_API_URL", None)
    code = "from prefect import flow\n@flow\ndef noop():\n    return 1\nnoop()\n"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def run_loop(out: Path, engine: str, args) -> float:
    from flows.demo import run_demo

    overrides = [f"generate.baseline_steps={args.baseline_steps}", f"train.steps={args.train_steps}"]
    os.environ["RAM_ENGINE_CACHE"] = str(out / "cache")  # nothing downloaded or trained by one run helps the other
    t = time.perf_counter()
    run_demo(str(out), n_images=args.images, engine=engine, overrides=overrides, say=lambda *a: None)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--baseline-steps", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    os.environ.setdefault("RAM_ENGINE_LOG", "WARNING")
    work = Path(tempfile.mkdtemp(prefix="ram-orchestration-"))
    try:
        cold = cold_start_seconds(work / "prefect-cold")
        print(f"cold start (temporary server, a no-op flow): {cold:.1f} s", flush=True)
        # the world and detector once, outside both timings (each loop then writes its own store)
        from flows.demo import run_demo
        run_demo(str(work / "warm-up"), n_images=args.images, engine="local", say=lambda *a: None,
                 overrides=["generate.baseline_steps=1", "train.steps=1"])
        for name in ("world", "detector"):  # the demo uses the shipped detector when it fits the world
            for out in ("local", "prefect"):
                if (work / "warm-up" / name).exists():
                    shutil.copytree(work / "warm-up" / name, work / out / name)
        local = run_loop(work / "local", "local", args)
        print(f"--engine local: the demo loop ({args.images} images) in {local:.1f} s")
        server, api, ready = start_server(work / "prefect-home")
        print(f"prefect server start-up: {ready:.1f} s (paid once per deployment, not per run)")
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: api}):  # settings are read at import: env is too late
                prefect = run_loop(work / "prefect", "prefect", args)
                drain_prefect()  # the run's last log lines reach the server before it stops
        finally:
            stop_server(server)
        print(f"--engine prefect (server running): the same loop in {prefect:.1f} s "
              f"(+{prefect - local:.1f} s); a cold start adds ~{cold:.0f} s")
        print(f"prefect / local wall time: {prefect / local:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
