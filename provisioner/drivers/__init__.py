"""Worker drivers: the narrow port between the control law and whatever runs workers.

It is deliberately this small (list, start, drain, delete, headroom) so that the OpenStack driver,
the local one and the simulator's fake fleet implement the same calls, and the control law is
exercised identically against all three.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

from cbmflow.errors import ConfigError
from provisioner.policy import WorkerView


def refuse_orphans_start() -> NoReturn:
    """A driver over the orphans (the workers of pools no longer configured) drains and deletes;
    it has no pool to boot workers for."""
    raise ConfigError("the orphans' driver starts no worker: their pool is no longer configured")


class WorkerDriver(Protocol):
    def list_workers(self) -> list[WorkerView]:
        """Live workers (servers not deleted, processes not exited), joined with their registry state."""
        ...

    def start(self, n: int) -> list[str]:
        """Boot ``n`` workers; returns the ids of those the cloud accepted (fewer on a quota error)."""
        ...

    def drain(self, ids: list[str]) -> list[str]:
        """Ask these workers to finish their current job and exit; returns the ids signalled."""
        ...

    def delete(self, ids: list[str]) -> list[str]:
        """Remove these servers/processes at once; the control law only asks this of non-busy ones."""
        ...

    def down(self) -> list[str]:
        """Drain every worker; returns the ids signalled."""
        ...

    def headroom(self) -> int | None:
        """How many more workers the quota admits; None when unknown or unlimited."""
        ...


__all__ = ["WorkerDriver", "WorkerView"]
