"""A temporary Prefect server owned by the engine's process, for `--engine prefect` without a server.

Prefect starts its own temporary server when PREFECT_API_URL is unset, and stops it at exit; a
SIGKILLed run never exits, so that server would run on. The engine starts the server itself instead:
the child watches its parent and stops when the parent is gone, however it died. Analytics are off
wherever the engine starts Prefect (no "Failed to send telemetry" on machines without network).

Several runs may share one PREFECT_HOME (its SQLite database) without a server: each starts its own
temporary server on that database. A server migrates the database as it starts, and two migrating a new
database at once break each other ("table artifact has no column named …": the second run failed), so
servers start one at a time (a lock file in PREFECT_HOME, held until the server answers); once migrated,
servers share the database (SQLite's WAL and busy timeout).

    python -m flows.temp_server PARENT_PID PORT      (the child; started by `ensure_server`)
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
import time

log = logging.getLogger("ram_engine")

# Set before Prefect is imported by any flow module: the engine's own settings.
QUIET_PREFECT = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def quiet_prefect() -> None:
    for key, value in QUIET_PREFECT.items():
        os.environ.setdefault(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_server: subprocess.Popen | None = None


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not start; the message says what to do."""


@contextlib.contextmanager
def _one_start_at_a_time(timeout_s: float):
    """Hold PREFECT_HOME's start lock (released by the kernel however this process ends)."""
    from prefect.settings import PREFECT_HOME

    home = PREFECT_HOME.value()
    home.mkdir(parents=True, exist_ok=True)
    path = home / ".ram-engine-server-start.lock"
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"another run has been starting a temporary Prefect server in PREFECT_HOME={home} for "
                        f"{timeout_s:.0f} s; start one server for all runs (`prefect server start`, then set "
                        f"PREFECT_API_URL), or use --engine local") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_server(timeout_s: float | None = None) -> str | None:
    """Point this process at a temporary Prefect server that cannot outlive it, started once per process.
    Returns its API URL, or None when PREFECT_API_URL already names a server (then nothing is started).

    It is stopped at exit, after Prefect's own exit handlers have sent their last logs and events to it
    (exit handlers run last-registered first, and this one is registered before any flow runs)."""
    global _server
    from prefect.settings import PREFECT_API_URL

    quiet_prefect()
    if _server is None and PREFECT_API_URL.value():
        return None
    if _server is not None:
        return os.environ["PREFECT_API_URL"]
    timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", **QUIET_PREFECT)
    with _one_start_at_a_time(timeout_s):   # a server answers once its database migration is done
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "flows.temp_server", str(os.getpid()), str(port)], env=env)
        url = f"http://127.0.0.1:{port}/api"
        try:
            _wait_healthy(proc, url, timeout_s)
        except BaseException:
            _stop(proc)
            raise
    _server = proc
    atexit.register(_stop, proc)
    log.info("temporary Prefect server on %s (pid %d); it stops with this process", url, proc.pid)
    # The environment reaches worker processes (Dask, torchrun); the setting, this process's client.
    os.environ["PREFECT_API_URL"] = url
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return url


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"the temporary Prefect server exited with code {proc.returncode} before it was "
                               f"ready; run `prefect server start` and set PREFECT_API_URL, or use --engine local")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(f"the temporary Prefect server was not ready after {timeout_s:.0f} s "
                       f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); start one with `prefect server start`")


def _die_with_parent(parent: int) -> None:
    """Stop this process when `parent` is gone (the child is then re-parented), however it died."""
    import signal

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    if os.getppid() != parent:  # died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(parent: int, port: int) -> None:
    _die_with_parent(parent)
    import uvicorn

    from prefect.server.api.server import create_app

    uvicorn.run(create_app(ephemeral=True, final=True), host="127.0.0.1", port=port, log_level="error",
                lifespan="on")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
