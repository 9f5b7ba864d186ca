"""Worker drivers: the narrow port between the control law and whatever runs workers.

It is deliberately this small (list, start, drain, down) so a cloud driver and an in-memory fake
implement the same four calls, and the policy can be tested without either.
"""

from __future__ import annotations

from typing import Protocol

from provisioner.policy import WorkerView


class WorkerDriver(Protocol):
    def list_workers(self) -> list[WorkerView]:
        """Live workers (not yet exited), with their registry state."""
        ...

    def start(self, n: int) -> list[str]:
        """Boot ``n`` workers; returns their ids."""
        ...

    def drain(self, ids: list[str]) -> list[str]:
        """Ask these workers to finish their current job and exit; returns the ids signalled."""
        ...

    def down(self) -> list[str]:
        """Drain every worker; returns the ids signalled."""
        ...


__all__ = ["WorkerDriver", "WorkerView"]
