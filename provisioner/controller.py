"""One control step around the pure law: list the fleet, decide, apply, remember.

The same ``Controller`` runs under ``provision scale`` (one step), ``provision watch`` (a loop)
and ``provision simulate`` (a simulated clock and fleet), so the simulation's figures are the
figures of the code that runs in production, not of a re-implementation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cbmflow.logging import get_logger
from provisioner.drivers import WorkerDriver
from provisioner.policy import History, Plan, Policy, decide

log = get_logger("provisioner")


class HistoryStore(Protocol):
    def load(self) -> History: ...

    def save(self, history: History) -> None: ...


@dataclass
class MemoryHistory:
    history: History = field(default_factory=History)

    def load(self) -> History:
        return self.history

    def save(self, history: History) -> None:
        self.history = history


@dataclass
class FileHistory:
    """JSON next to the lock file; written atomically, and a corrupt file means an empty history
    (the worst outcome is one step without the stabilisation window, never a crash loop)."""

    path: Path

    def load(self) -> History:
        try:
            return History.from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return History()

    def save(self, history: History) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(history.to_json()))
        tmp.replace(self.path)


@dataclass(frozen=True)
class Applied:
    started: list[str]
    drained: list[str]
    deleted: list[str]


class Controller:
    def __init__(
        self,
        driver: WorkerDriver,
        policy: Policy,
        history: HistoryStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.driver = driver
        self.policy = policy
        self.history = history or MemoryHistory()
        self.clock = clock

    def step(self, backlog: int, *, dry_run: bool = False) -> tuple[Plan, Applied]:
        workers = self.driver.list_workers()
        # Quota is asked only when a start is possible: it is an API call per step otherwise wasted.
        headroom = self.driver.headroom() if backlog > 0 or self.policy.min_workers > 0 else None
        previous = self.history.load()
        plan, history = decide(self.clock(), backlog, workers, self.policy, previous, headroom)
        if dry_run:
            return plan, Applied([], [], [])
        # Deletes first: they free quota for the starts of the same step.
        deleted = self.driver.delete(plan.delete) if plan.delete else []
        drained = self.driver.drain(plan.drain) if plan.drain else []
        started = self.driver.start(plan.start) if plan.start else []
        if plan.start and not started and not drained:
            # Nothing was booted after all (quota, API error): that was no scale event to cool down from.
            history = History(history.wants, previous.last_scale_s)
        self.history.save(history)
        return plan, Applied(started, drained, deleted)
