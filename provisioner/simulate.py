"""``provision simulate``: the real ``Controller`` and control law against a simulated queue and fleet.

Scaling mistakes are expensive to find in production (a season backfill happens once a year, a
killed three-hour job is noticed by nobody), so the law is run here against a fleet model with
the properties that matter: servers take minutes to boot and a few never register or go to ERROR;
jobs take a log-normally distributed time; the registry reports a worker's state only at its
heartbeat, so the provisioner sees it up to 10 s late; the management API's backlog is sampled a
few seconds late; and a drained worker finishes its job before it stops. The simulated clock
advances in one-second ticks.

The fleet keeps its own ground truth, independent of what the controller believes: a delete that
hits a server in the middle of a job is counted as a *busy kill* (and the job is requeued), which
the law must never cause. *Reversals* count scale-down events followed by a scale-up (or the
reverse) within ``reversal_window_s``: that is oscillation, paid for in boot minutes.

One run is one pool: its policy (``Policy.from_settings`` of a pool, or built by hand) against its
own queue. Pools do not share workers, so a CARD pool and an extraction pool are simulated apart,
each with its own job time (``job_median_s``, ``job_sigma``) and arrivals (``custom``).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from provisioner.controller import Controller
from provisioner.policy import Policy, WorkerView

HEARTBEAT_S = 10


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    arrivals: Callable[[random.Random], list[float]]  # job arrival times (s)
    horizon_s: float  # arrivals stop by then; the run continues until the queue is empty
    job_median_s: float = 120.0
    job_sigma: float = 0.5
    boot_delay_s: float = 180.0
    boot_jitter_s: float = 60.0
    error_rate: float = 0.0  # servers that go to ERROR instead of booting
    stuck_rate: float = 0.0  # servers that boot but whose worker never registers
    step_s: float = 60.0  # control interval of `provision watch`
    management_lag_s: float = 5.0
    quota: int | None = None  # servers the project admits


def poisson_batches(
    rate_per_h: float, poll_s: float, until_s: float, start_s: float = 0.0
) -> Callable[[random.Random], list[float]]:
    """Jobs as the catalogue watcher publishes them: a Poisson count per poll, all at the poll time."""

    def arrivals(rng: random.Random) -> list[float]:
        times: list[float] = []
        t = start_s
        mean = rate_per_h * poll_s / 3600.0
        while t < until_s:
            if mean > 30.0:
                # Knuth's product would underflow for large means; the normal approximation is
                # within a fraction of a job there (a national area's CARD inputs per poll).
                k = max(0, round(rng.gauss(mean, math.sqrt(mean))))
            else:
                # Knuth's method, exact for the small means of one area's 5-minute polls.
                limit, k, p = math.exp(-mean), 0, 1.0
                while True:
                    p *= rng.random()
                    if p <= limit:
                        break
                    k += 1
            times.extend([t] * k)
            t += poll_s
        return times

    return arrivals


def burst(count: int, at_s: float, over_s: float = 0.0) -> Callable[[random.Random], list[float]]:
    """A backfill: ``count`` jobs published at once (or spread evenly over ``over_s``)."""

    def arrivals(_: random.Random) -> list[float]:
        return [at_s + (over_s * i / count if over_s else 0.0) for i in range(count)]

    return arrivals


def combined(*parts: Callable[[random.Random], list[float]]) -> Callable[[random.Random], list[float]]:
    def arrivals(rng: random.Random) -> list[float]:
        return sorted(t for part in parts for t in part(rng))

    return arrivals


def overpasses(
    passes_per_day: int, scenes: tuple[int, int], spread_s: float, poll_s: float, days: float
) -> Callable[[random.Random], list[float]]:
    """Sentinel-2 as it really arrives: a few passes a day over the area of interest, each publishing
    its tiles within ``spread_s``, which the watcher picks up in ``poll_s`` batches."""

    def arrivals(rng: random.Random) -> list[float]:
        times: list[float] = []
        period = 86400.0 / passes_per_day
        for k in range(int(days * passes_per_day)):
            begin = k * period + rng.uniform(0, period / 2)
            for _ in range(rng.randint(*scenes)):
                published = begin + rng.uniform(0, spread_s)
                times.append(math.ceil(published / poll_s) * poll_s)
        return times

    return arrivals


HOUR = 3600.0
DAILY = overpasses(6, (10, 40), 1800.0, 300.0, 1.0)
SCENARIOS: dict[str, Scenario] = {
    "daily": Scenario(
        name="daily",
        description="in-season day: 6 passes, each publishing 10-40 scenes over 30 min, "
        "picked up by 5-minute watcher polls (24 h)",
        arrivals=DAILY,
        horizon_s=24 * HOUR,
    ),
    "backfill": Scenario(
        name="backfill",
        description="season backfill: 3000 scenes published at once, on top of the daily pattern (24 h)",
        arrivals=combined(burst(3000, 0.0), DAILY),
        horizon_s=24 * HOUR,
    ),
    "trickle": Scenario(
        name="trickle",
        description="a thin steady load: Poisson 40 scenes/h in 5-minute polls (8 h); "
        "shows what scale-to-zero costs when the mean load is ~1.5 workers",
        arrivals=poisson_batches(40.0, 300.0, 8 * HOUR),
        horizon_s=8 * HOUR,
    ),
}


def custom(
    burst_jobs: int = 0,
    rate_per_h: float = 0.0,
    hours: float = 24.0,
    poll_s: float = 300.0,
    name: str = "custom",
    **timings: Any,
) -> Scenario:
    """A pool's own load: ``burst_jobs`` published at once (a backfill) plus ``rate_per_h`` jobs an
    hour arriving in ``poll_s`` batches for ``hours``; ``timings`` are any Scenario field
    (``job_median_s``, ``job_sigma``, ``boot_delay_s``…), e.g. a CARD job's minutes."""
    parts = []
    if burst_jobs > 0:
        parts.append(burst(burst_jobs, 0.0))
    if rate_per_h > 0:
        parts.append(poisson_batches(rate_per_h, poll_s, hours * HOUR))
    what = [f"{burst_jobs} jobs at once"] if burst_jobs > 0 else []
    what += [f"Poisson {rate_per_h:g} jobs/h in {poll_s:.0f} s polls"] if rate_per_h > 0 else []
    return Scenario(
        name=name,
        description=f"{' plus '.join(what) or 'no jobs'} over {hours:g} h",
        arrivals=combined(*parts),
        horizon_s=hours * HOUR,
        **timings,
    )


@dataclass
class _Server:
    id: str
    created_s: float
    ready_s: float  # when the worker registers
    fate: str  # ok | error | stuck
    job: tuple[float, float, float] | None = None  # (arrival, finish, start) of the job in hand
    draining_since_s: float | None = None
    stopped: bool = False
    reported: WorkerView | None = None  # the registry row as of the last heartbeat


@dataclass
class Result:
    scenario: str
    per_worker: int
    jobs: int
    done: int
    makespan_s: float
    vm_minutes: float
    wait_p50_s: float
    wait_p95_s: float
    wait_max_s: float
    servers_started: int
    scale_ups: int
    scale_downs: int
    reconcile_deletes: int
    busy_kills: int
    reversals: int
    peak_fleet: int
    fleet_timeline: list[tuple[float, int]] = field(default_factory=list)
    work_minutes: float = 0.0  # job time of the jobs done: the floor under vm_minutes
    first_job_start_s: float = 0.0
    """When the first job started: the fleet's boot time for a burst arriving at 0."""
    last_job_end_s: float = 0.0
    """When the last job done ended."""

    @property
    def utilisation(self) -> float:
        """Share of the VM time spent on jobs (the rest: boots, idling in the window, drains)."""
        return self.work_minutes / self.vm_minutes if self.vm_minutes else 0.0

    def row(self) -> dict[str, float | int | str]:
        return {
            "scenario": self.scenario,
            "per_worker": self.per_worker,
            "jobs": self.jobs,
            "VM-minutes": round(self.vm_minutes),
            "p50 wait (min)": round(self.wait_p50_s / 60, 1),
            "p95 wait (min)": round(self.wait_p95_s / 60, 1),
            "max wait (min)": round(self.wait_max_s / 60, 1),
            "makespan (h)": round(self.makespan_s / 3600, 2),
            "servers started": self.servers_started,
            "scale-ups": self.scale_ups,
            "scale-downs": self.scale_downs,
            "reconcile deletes": self.reconcile_deletes,
            "busy kills": self.busy_kills,
            "reversals": self.reversals,
            "peak fleet": self.peak_fleet,
            "work (VM-min)": round(self.work_minutes),
            "utilisation": round(self.utilisation, 2),
        }


class SimFleet:
    """The driver port over simulated servers; also the ground truth the metrics come from."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.sc = scenario
        self.rng = rng
        self.now = 0.0
        self.servers: dict[str, _Server] = {}
        self.gone: list[tuple[float, float]] = []  # (created, deleted) of deleted servers
        self.queue: deque[float] = deque()  # arrival times of ready jobs
        self.waits: list[float] = []
        self.first_start_s: float | None = None
        self.last_end_s = 0.0
        self.done = 0
        self.work_s = 0.0
        self.busy_kills = 0
        self.reconcile_deletes = 0
        self.started = 0
        self._seq = 0

    # ---- the driver port ---------------------------------------------------------------------
    def list_workers(self) -> list[WorkerView]:
        views = []
        for s in self.servers.values():
            if s.fate == "error" and self.now >= s.created_s + 30:
                views.append(WorkerView(id=s.id, state="starting", started_at_s=s.created_s, registered=False,
                                        server_status="ERROR"))  # fmt: skip
            elif s.reported is None:
                views.append(WorkerView(id=s.id, state="starting", started_at_s=s.created_s, registered=False,
                                        server_status="BUILD" if self.now < s.ready_s else "ACTIVE"))  # fmt: skip
            else:
                state = "draining" if s.draining_since_s is not None and not s.stopped else s.reported.state
                views.append(replace(s.reported, state=state, draining_since_s=s.draining_since_s))
        return views

    def start(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            self._seq += 1
            roll = self.rng.random()
            fate = "ok"
            if roll < self.sc.error_rate:
                fate = "error"
            elif roll < self.sc.error_rate + self.sc.stuck_rate:
                fate = "stuck"
            delay = self.sc.boot_delay_s + self.rng.uniform(0, self.sc.boot_jitter_s)
            s = _Server(id=f"sim-{self._seq:04d}", created_s=self.now, ready_s=self.now + delay, fate=fate)
            self.servers[s.id] = s
            ids.append(s.id)
        self.started += len(ids)
        return ids

    def drain(self, ids: list[str]) -> list[str]:
        for i in ids:
            s = self.servers.get(i)
            if s is not None and s.draining_since_s is None:
                s.draining_since_s = self.now
        return [i for i in ids if i in self.servers]

    def delete(self, ids: list[str]) -> list[str]:
        deleted = []
        for i in ids:
            s = self.servers.pop(i, None)
            if s is None:
                continue
            if s.job is not None:
                self.busy_kills += 1
                self.queue.appendleft(s.job[0])  # the broker redelivers the unacked job
            if not s.stopped:
                self.reconcile_deletes += 1
            self.gone.append((s.created_s, self.now))
            deleted.append(i)
        return deleted

    def down(self) -> list[str]:
        return self.drain(list(self.servers))

    def headroom(self) -> int | None:
        return None if self.sc.quota is None else self.sc.quota - len(self.servers)

    # ---- the world ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance one second: finish jobs, register booted workers, hand out jobs, heartbeat."""
        for s in self.servers.values():
            if s.job is not None and self.now >= s.job[1]:
                self.work_s += s.job[1] - s.job[2]
                self.last_end_s = max(self.last_end_s, s.job[1])
                s.job = None
                self.done += 1
            if s.stopped or s.fate != "ok" or self.now < s.ready_s:
                continue
            if s.draining_since_s is not None and s.job is None and self.now - s.draining_since_s >= HEARTBEAT_S:
                s.stopped = True  # the worker saw the drain at its heartbeat, had no job, exited
            elif s.draining_since_s is None and s.job is None and self.queue:
                arrival = self.queue.popleft()
                self.waits.append(self.now - arrival)
                if self.first_start_s is None:
                    self.first_start_s = self.now
                duration = self.rng.lognormvariate(math.log(self.sc.job_median_s), self.sc.job_sigma)
                s.job = (arrival, self.now + duration, self.now)
            beat = int(self.now - s.ready_s) % HEARTBEAT_S == 0
            if beat or s.reported is None or s.stopped:
                s.reported = WorkerView(
                    id=s.id,
                    state="stopped" if s.stopped else "busy" if s.job else "idle",
                    started_at_s=s.created_s,
                    current_scene=1 if s.job else None,
                    heartbeat_age_s=0.0,
                    registered=True,
                    server_status="ACTIVE",
                )
            elif s.reported is not None:
                s.reported = replace(s.reported, heartbeat_age_s=(s.reported.heartbeat_age_s or 0.0) + 1)

    def backlog(self) -> int:
        return len(self.queue) + sum(1 for s in self.servers.values() if s.job is not None)

    def vm_seconds(self) -> float:
        return sum(d - c for c, d in self.gone) + sum(self.now - s.created_s for s in self.servers.values())


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def simulate(scenario: Scenario, policy: Policy, seed: int = 1, reversal_window_s: float = 600.0) -> Result:
    rng = random.Random(seed)
    arrivals = deque(sorted(scenario.arrivals(rng)))
    jobs = len(arrivals)
    fleet = SimFleet(scenario, rng)
    controller = Controller(fleet, policy, clock=lambda: fleet.now)
    samples: deque[tuple[float, int]] = deque()
    events: list[tuple[float, int]] = []  # (time, +1 up / -1 down)
    timeline: list[tuple[float, int]] = []
    peak = 0
    next_step = 0.0
    limit_s = scenario.horizon_s + 48 * HOUR
    while fleet.now < limit_s:
        while arrivals and arrivals[0] <= fleet.now:
            fleet.queue.append(arrivals.popleft())
        fleet.tick()
        samples.append((fleet.now, fleet.backlog()))
        while samples and samples[0][0] < fleet.now - scenario.management_lag_s:
            samples.popleft()
        if fleet.now >= next_step:
            plan, applied = controller.step(samples[0][1])
            surplus = [a for a in plan.actions if a.kind == "drain" and a.why.startswith("surplus")]
            if applied.started:
                events.append((fleet.now, +1))
            if surplus:
                events.append((fleet.now, -1))
            peak = max(peak, len(fleet.servers))
            timeline.append((fleet.now, len(fleet.servers)))
            next_step += scenario.step_s
            settled = len(fleet.servers) <= policy.min_workers and all(
                s.draining_since_s is None for s in fleet.servers.values()
            )
            if not arrivals and fleet.done >= jobs and settled and fleet.now > scenario.horizon_s:
                break
        fleet.now += 1.0
    reversals = sum(
        1 for (t0, d0), (t1, d1) in zip(events, events[1:], strict=False) if d0 != d1 and t1 - t0 < reversal_window_s
    )
    return Result(
        scenario=scenario.name,
        per_worker=policy.per_worker,
        jobs=jobs,
        done=fleet.done,
        makespan_s=fleet.now,
        vm_minutes=fleet.vm_seconds() / 60.0,
        wait_p50_s=_percentile(fleet.waits, 0.50),
        wait_p95_s=_percentile(fleet.waits, 0.95),
        wait_max_s=max(fleet.waits, default=0.0),
        servers_started=fleet.started,
        scale_ups=sum(1 for _, d in events if d > 0),
        scale_downs=sum(1 for _, d in events if d < 0),
        reconcile_deletes=fleet.reconcile_deletes,
        busy_kills=fleet.busy_kills,
        reversals=reversals,
        peak_fleet=peak,
        fleet_timeline=timeline,
        work_minutes=fleet.work_s / 60.0,
        first_job_start_s=fleet.first_start_s or 0.0,
        last_job_end_s=fleet.last_end_s,
    )
