"""A real MLflow tracking server for teams: ``calozoo mlflow`` runs :func:`server_command`.

Defaults: a sqlite backend store ``./mlflow.db`` (any SQLAlchemy URI, e.g. ``postgresql://...``,
by ``--backend-store-uri``), artifacts proxied by the server into ``./mlartifacts``, bound to
127.0.0.1 (``--host 0.0.0.0`` to open it to the network), one worker, and MLflow's job runner off
(it starts 7 processes and about 2 GB that calozoo does not use).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["server_command", "server_env", "start_server", "stop_server", "wait_for_server"]


def server_command(backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                   host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    backend = backend_store_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    artifacts = artifacts_destination or str(Path("mlartifacts").resolve())
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow") or "mlflow"
    return [exe, "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
            "--host", host, "--port", str(port), "--workers", str(workers)]


def server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def wait_for_server(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url``/health answers; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"mlflow server at {url} did not answer within {timeout:.0f} s")


def start_server(backend_store_uri: str, artifacts_destination: str, port: int, host: str = "127.0.0.1",
                 log_path=None, timeout: float = 90.0) -> subprocess.Popen:
    """Start ``mlflow server`` in the background and wait until it answers."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(server_command(backend_store_uri, artifacts_destination, host, port), env=server_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_server(f"http://{host}:{port}", timeout, proc)
    except Exception:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`start_server` (its whole process group)."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
