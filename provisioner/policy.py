"""The scaling control law, kept pure (no clock, no I/O) so it can be tested as a table, simulated
for hours in a second, and reasoned about alone.

Anchors:

* KEDA's RabbitMQ scaler in ``QueueLength`` mode and ScaledJob's ``maxScale =
  min(maxReplicaCount, ceil(queueLength / target))`` (keda-docs, scalers/rabbitmq-queue.md and
  reference/scaledjob-spec.md): the wanted size is the backlog divided by what one worker should
  absorb, rounded up, clamped to the bounds.
* AWS "backlog per instance" (EC2 Auto Scaling user guide, as-using-sqs-queue): target =
  acceptable latency / mean processing time, which is how ``per_worker`` is chosen. The backlog
  counts ready *and* unacknowledged messages, because a job being processed still occupies a worker
  (``cbmflow.bus.QueueDepth.backlog``); the AMQP passive declare cannot see the latter.
* Kubernetes HPA: scale up at once (bounded per step, like HPA's "+4 pods per period"), scale down
  to the *highest* recommendation over a stabilisation window (300 s by default there), so a brief
  dip in the backlog never stops workers that are wanted again a minute later. A cooldown after any
  scale event (OpenStack Senlin's ``cooldown``, KEDA's ``cooldownPeriod``) is the second brake.
* AWS scale-in protection and lifecycle hooks (gracefully-handle-instance-termination): a job can
  run for many minutes, so capacity is only ever removed through a drain, and only from workers
  known to be idle; a busy worker is never deleted, not even one in ERROR or past its lifetime
  (a worker is busy while its heartbeat is fresh).

Booting servers count as capacity (a BUILD server is a worker a few minutes from now); counting
them as missing would boot a second wave on every step of a slow boot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Worker states that still count as capacity. ``unknown`` (registry unreachable) counts, so a
# database outage never triggers a burst of new workers.
CAPACITY_STATES = frozenset({"starting", "idle", "busy", "unknown"})
# Nova statuses of a server that is not running and will not run again by itself: it holds quota
# (and, SHUTOFF apart, is often still billed) while doing nothing, so it is replaced like ERROR.
# A SHUTOFF server is typically a guest that powered itself off (a kernel panic with
# panic=poweroff, an OOM-killed init) or one stopped by a host maintenance.
DEAD_STATUSES = frozenset(
    {"ERROR", "SHUTOFF", "SUSPENDED", "PAUSED", "SHELVED", "SHELVED_OFFLOADED", "SOFT_DELETED", "DELETED"}
)


@dataclass(frozen=True)
class WorkerView:
    """What a driver knows about one worker, joined with the ``workers`` registry row.

    ``registered`` is None when the registry could not be read: then nobody knows whether the
    worker ever started, and nothing is deleted on that account.
    """

    id: str
    state: str  # starting | idle | busy | draining | stopped | unknown
    started_at_s: float = 0.0  # epoch seconds the server/process was created
    pid: int | None = None
    current_scene: int | None = None
    heartbeat_age_s: float | None = None
    detail: str = ""
    registered: bool | None = None
    server_status: str = ""  # the driver's own view: ACTIVE, BUILD, ERROR (openstack); running (local)
    draining_since_s: float | None = None
    server_id: str = ""
    address: str = ""
    pool: str = ""  # the pool the server was started for (its tag or id), which may no longer be configured


@dataclass(frozen=True)
class Policy:
    """Bounds and timings of the control law (see ``ProvisionSettings`` for their meaning)."""

    per_worker: int
    min_workers: int
    max_workers: int
    max_surge: int | None = None
    scale_down_window_s: float = 0.0
    cooldown_s: float = 0.0
    boot_timeout_s: float = 900.0
    max_lifetime_s: float = 0.0
    drain_timeout_s: float = 900.0
    stale_heartbeat_s: float = 300.0

    def __post_init__(self) -> None:
        desired_workers(0, self.per_worker, self.min_workers, self.max_workers)  # validates the bounds
        if self.max_surge is not None and self.max_surge < 1:
            raise ValueError(f"max_surge must be >= 1, got {self.max_surge}")

    @classmethod
    def from_settings(cls, settings: Any) -> Policy:
        """From a ``ProvisionSettings`` (typed loosely so this module imports nothing of ours)."""
        return cls(
            per_worker=settings.per_worker,
            min_workers=settings.min_workers,
            max_workers=settings.max_workers,
            max_surge=settings.max_surge,
            scale_down_window_s=settings.effective_scale_down_window_s(),
            cooldown_s=settings.effective_cooldown_s(),
            boot_timeout_s=settings.boot_timeout_s,
            max_lifetime_s=settings.max_lifetime_s,
            drain_timeout_s=settings.drain_timeout_s,
            stale_heartbeat_s=settings.stale_heartbeat_s,
        )


@dataclass(frozen=True)
class History:
    """What the law remembers between steps: recent wants (for the window) and the last scale event.

    It is persisted by the caller (a JSON file per pool), so a restarted provisioner keeps its
    stabilisation window instead of draining everything on its first step.
    """

    wants: tuple[tuple[float, int], ...] = ()
    last_scale_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"wants": [list(w) for w in self.wants], "last_scale_s": self.last_scale_s}

    @classmethod
    def from_json(cls, data: Any) -> History:
        if not isinstance(data, dict):
            return cls()
        wants = tuple((float(t), int(w)) for t, w in data.get("wants", []) or [])
        last = data.get("last_scale_s")
        return cls(wants=wants, last_scale_s=float(last) if last is not None else None)


@dataclass(frozen=True)
class Action:
    kind: Literal["drain", "delete"]
    worker_id: str
    why: str


@dataclass(frozen=True)
class Plan:
    backlog: int
    fleet: int  # workers counted as capacity (booting, idle, busy, unknown)
    want: int
    start: int = 0
    actions: tuple[Action, ...] = ()
    target: int = 0  # the stabilised want that scale-down follows
    reason: str = ""

    @property
    def drain(self) -> list[str]:
        return [a.worker_id for a in self.actions if a.kind == "drain"]

    @property
    def delete(self) -> list[str]:
        return [a.worker_id for a in self.actions if a.kind == "delete"]

    def __str__(self) -> str:
        parts = []
        if self.start:
            parts.append(f"start {self.start}")
        if self.drain:
            parts.append(f"drain {', '.join(self.drain)}")
        if self.delete:
            parts.append(f"delete {', '.join(self.delete)}")
        return (
            f"backlog {self.backlog}, fleet {self.fleet} → want {self.want}: "
            f"{'; '.join(parts) or 'no change'}{f' ({self.reason})' if self.reason else ''}"
        )


def desired_workers(backlog: int, per_worker: int, min_workers: int, max_workers: int) -> int:
    """clamp(ceil(backlog / per_worker), min_workers, max_workers)."""
    if per_worker < 1:
        raise ValueError(f"per_worker must be >= 1, got {per_worker}")
    if min_workers < 0 or max_workers < min_workers:
        raise ValueError(f"need 0 <= min_workers <= max_workers, got {min_workers}..{max_workers}")
    return max(min_workers, min(max_workers, math.ceil(max(backlog, 0) / per_worker)))


def is_busy(worker: WorkerView, policy: Policy) -> bool:
    """Whether the worker may be running a job, which forbids deleting it.

    A busy row with a stale heartbeat is a dead worker: its scene lease has expired and another
    worker takes the scene over, so it no longer protects its server. A worker whose registry
    cannot be read may be busy, so it is treated as busy.
    """
    if worker.state == "unknown":
        return True
    if worker.state == "busy" or worker.current_scene is not None:
        return worker.heartbeat_age_s is None or worker.heartbeat_age_s < policy.stale_heartbeat_s
    return False


def decide(
    now_s: float,
    backlog: int,
    workers: Sequence[WorkerView],
    policy: Policy,
    history: History = History(),
    headroom: int | None = None,
) -> tuple[Plan, History]:
    """One control step: reconcile broken servers, then scale up at once or down through drains.

    ``headroom`` is how many more servers the cloud quota admits (None: unknown or unlimited).
    """
    actions: list[Action] = []
    notes: list[str] = []
    removed: set[str] = set()

    def delete(w: WorkerView, why: str) -> None:
        if is_busy(w, policy):
            notes.append(f"{w.id} not deleted ({why}): busy")
            return
        actions.append(Action("delete", w.id, why))
        removed.add(w.id)

    def drain(w: WorkerView, why: str) -> None:
        actions.append(Action("drain", w.id, why))
        removed.add(w.id)

    # ---- reconcile: what is broken, finished or too old -----------------------------------------
    for w in workers:
        age_s = now_s - w.started_at_s if w.started_at_s else 0.0
        status = w.server_status.upper()
        if status in DEAD_STATUSES:
            delete(w, f"server in {status}")
        elif w.state == "stopped":
            delete(w, "worker exited")
        elif w.state == "draining":
            removed.add(w.id)  # no longer capacity, whatever happens next
            since = w.draining_since_s
            if since is not None and now_s - since > policy.drain_timeout_s:
                delete(w, f"drain not finished after {policy.drain_timeout_s:.0f} s")
        elif w.state in ("idle", "busy") and (w.heartbeat_age_s or 0.0) > policy.stale_heartbeat_s:
            # A hung process or a frozen VM: the registry row says idle or busy but nothing has
            # renewed it. A busy one's lease has expired by now, so its scene is taken over.
            delete(w, f"no heartbeat for {w.heartbeat_age_s:.0f} s")
        elif w.registered is False and age_s > policy.boot_timeout_s:
            delete(w, f"no registration within {policy.boot_timeout_s:.0f} s")
        elif policy.max_lifetime_s and age_s > policy.max_lifetime_s:
            drain(w, f"older than {policy.max_lifetime_s:.0f} s")

    fleet = [w for w in workers if w.id not in removed and w.state in CAPACITY_STATES]
    want = desired_workers(backlog, policy.per_worker, policy.min_workers, policy.max_workers)
    window = [(t, n) for t, n in history.wants if now_s - t < policy.scale_down_window_s]
    window.append((now_s, want))
    target = max(n for _, n in window)
    last_scale = history.last_scale_s
    start = 0

    if want > len(fleet):
        shortfall = want - len(fleet)
        start = shortfall
        if policy.max_surge is not None and start > policy.max_surge:
            start = policy.max_surge
            notes.append(f"surge limited to {policy.max_surge}")
        if headroom is not None and start > max(headroom, 0):
            start = max(headroom, 0)
            notes.append(f"quota admits {start} more")
        if start:
            last_scale = now_s
    elif target < len(fleet):
        since_scale = now_s - last_scale if last_scale is not None else math.inf
        if since_scale < policy.cooldown_s:
            notes.append(f"scale-down in cooldown for {policy.cooldown_s - since_scale:.0f} s")
        else:
            surplus = len(fleet) - target
            idle = sorted(
                (w for w in fleet if w.state == "idle" and not is_busy(w, policy)),
                key=lambda w: (w.started_at_s, w.id),
            )
            for w in idle[:surplus]:
                drain(w, f"surplus: want {target}")
            if len(idle) < surplus:
                notes.append(f"{surplus - len(idle)} surplus worker(s) not idle; left running")
            if idle[:surplus]:
                last_scale = now_s
    elif target > want and want < len(fleet):
        notes.append(f"held at {target} by the stabilisation window")

    step = Plan(
        backlog=backlog,
        fleet=len(fleet),
        want=want,
        start=start,
        actions=tuple(actions),
        target=target,
        reason="; ".join(notes),
    )
    return step, History(wants=tuple(window), last_scale_s=last_scale)
