"""Run the API as a real uvicorn subprocess: for benchmarks and for tests that need HTTP on a port.

One place owns start-up (wait for ``/healthz``) and teardown (signal the whole process group),
so every caller gets the same behaviour, including multi-worker servers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(dsn: str, workers: int = 1, env: dict[str, str] | None = None, timeout_s: float = 60) -> Iterator[str]:
    """Yield the base URL of a running API on a free 127.0.0.1 port; stop it on exit."""
    port = free_port()
    full_env = {
        **os.environ,
        "CBMFLOW_DB_DSN": dsn,
        "CBMFLOW_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from api.server import serve; serve('127.0.0.1', {port}, {workers})"],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
