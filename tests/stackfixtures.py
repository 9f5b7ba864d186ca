"""What the server fixtures of ``tests/conftest.py`` hand out, importable by name from every test
layer (``from conftest import`` would find ``tests/unit/conftest.py`` first when the unit layer is
collected before the others, e.g. ``pytest tests/unit tests/integration``). Not collected."""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cbmflow.dev.stack import PgInfo, RabbitInfo


@dataclass(frozen=True)
class Stack:
    """The session's servers."""

    base_dir: Path
    pg: PgInfo
    rabbit: RabbitInfo
    run_as: str


@dataclass(frozen=True)
class CbmEnv:
    """What ``cbm_env`` put into the environment, for tests that pass values explicitly."""

    dsn: str
    amqp_url: str
    management_url: str
    state_dir: Path
    vhost: str


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (held together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def traversable_tmpdir(prefix: str) -> Path:
    """A temp dir the unprivileged run-as user can reach (pytest's own tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
