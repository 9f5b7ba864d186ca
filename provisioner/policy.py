"""The scaling control law, kept pure so it can be tested as a table and reasoned about alone.

Anchors:

* KEDA's RabbitMQ scaler in ``QueueLength`` mode and ScaledJob's ``maxScale =
  min(maxReplicaCount, ceil(queueLength / target))`` (keda-docs, scalers/rabbitmq-queue.md and
  reference/scaledjob-spec.md): the wanted size is the backlog divided by what one replica should
  absorb, rounded up, clamped to the bounds.
* AWS "backlog per instance" (EC2 Auto Scaling user guide, as-using-sqs-queue): queue depth per
  in-service instance, target = acceptable latency / mean processing time. The backlog counts ready
  *and* unacknowledged messages, because a job being processed still occupies a worker
  (``cbmflow.bus.QueueDepth.backlog``).
* Kubernetes HPA scale-down stabilisation (highest recommendation over a 300 s window; scale-up
  immediate): ``recent_wants`` lets the caller pass the window's earlier recommendations so a brief
  dip in the backlog does not stop workers that are needed again a minute later.
* AWS scale-in protection and lifecycle hooks (gracefully-handle-instance-termination): a job can
  run for minutes, so workers are only ever removed through a drain, and only those known to be
  idle; a busy or unknown one is never picked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Worker states that still count as capacity. ``unknown`` (registry unreachable) counts, so a
# database outage never triggers a burst of new workers.
CAPACITY_STATES = frozenset({"starting", "idle", "busy", "unknown"})


@dataclass(frozen=True)
class WorkerView:
    """What a driver knows about one worker; ``state`` comes from the ``workers`` registry table."""

    id: str
    state: str  # starting | idle | busy | draining | stopped | unknown
    started_at_s: float = 0.0  # epoch seconds; oldest idle workers are drained first
    pid: int | None = None
    current_scene: int | None = None
    heartbeat_age_s: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Plan:
    backlog: int
    fleet: int
    want: int
    start: int = 0
    drain: list[str] = field(default_factory=list)
    reason: str = ""

    def __str__(self) -> str:
        actions = []
        if self.start:
            actions.append(f"start {self.start}")
        if self.drain:
            actions.append(f"drain {', '.join(self.drain)}")
        return (
            f"backlog {self.backlog}, fleet {self.fleet} → want {self.want}: "
            f"{'; '.join(actions) or 'no change'}{f' ({self.reason})' if self.reason else ''}"
        )


def desired_workers(backlog: int, per_worker: int, min_workers: int, max_workers: int) -> int:
    """clamp(ceil(backlog / per_worker), min_workers, max_workers)."""
    if per_worker < 1:
        raise ValueError(f"per_worker must be >= 1, got {per_worker}")
    if min_workers < 0 or max_workers < min_workers:
        raise ValueError(f"need 0 <= min_workers <= max_workers, got {min_workers}..{max_workers}")
    return max(min_workers, min(max_workers, math.ceil(max(backlog, 0) / per_worker)))


def plan(
    backlog: int,
    current: Sequence[WorkerView],
    *,
    per_worker: int,
    min_workers: int,
    max_workers: int,
    recent_wants: Sequence[int] = (),
    max_surge: int | None = None,
) -> Plan:
    """Start the missing workers now; drain surplus idle ones, never busy or unknown ones."""
    want = desired_workers(backlog, per_worker, min_workers, max_workers)
    fleet = [w for w in current if w.state in CAPACITY_STATES]
    if want > len(fleet):
        start = want - len(fleet)
        if max_surge is not None:
            start = min(start, max_surge)
        return Plan(backlog, len(fleet), want, start=start)
    target = max([want, *recent_wants])
    if target >= len(fleet):
        reason = f"held at {target} by the stabilisation window" if target > want else ""
        return Plan(backlog, len(fleet), want, reason=reason)
    idle = sorted((w for w in fleet if w.state == "idle"), key=lambda w: (w.started_at_s, w.id))
    surplus = len(fleet) - target
    chosen = [w.id for w in idle[:surplus]]
    reason = ""
    if len(chosen) < surplus:
        reason = f"{surplus - len(chosen)} surplus worker(s) not idle; left running"
    return Plan(backlog, len(fleet), want, drain=chosen, reason=reason)
