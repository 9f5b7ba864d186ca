"""The control law as tables, its invariants over thousands of random fleets, and the controller
that persists its history between steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cbmflow.settings import ProvisionSettings
from provisioner.controller import Controller, FileHistory, MemoryHistory
from provisioner.policy import (
    CAPACITY_STATES,
    History,
    Plan,
    Policy,
    WorkerView,
    decide,
    desired_workers,
    is_busy,
)

NOW = 100_000.0


@pytest.mark.parametrize(
    ("backlog", "per_worker", "min_w", "max_w", "want"),
    [
        (0, 5, 0, 4, 0),  # nothing to do: scale to zero
        (0, 5, 2, 4, 2),  # ...but never below min
        (-3, 5, 1, 4, 1),  # a bogus negative reading is treated as empty
        (1, 5, 0, 4, 1),  # one job wakes one worker
        (5, 5, 0, 4, 1),
        (6, 5, 0, 4, 2),  # rounding is up: 6 jobs at 5 per worker need 2
        (10, 5, 0, 4, 2),
        (11, 5, 0, 4, 3),
        (10**9, 5, 0, 4, 4),  # huge backlog: capped at max
        (3, 1, 0, 10, 3),
        (7, 1, 7, 7, 7),
    ],
)
def test_desired_workers_table(backlog: int, per_worker: int, min_w: int, max_w: int, want: int) -> None:
    assert desired_workers(backlog, per_worker, min_w, max_w) == want


@pytest.mark.parametrize(
    ("per_worker", "min_w", "max_w", "surge"), [(0, 0, 1, 1), (5, -1, 1, 1), (5, 3, 2, 1), (5, 0, 1, 0)]
)
def test_nonsense_bounds_are_refused(per_worker: int, min_w: int, max_w: int, surge: int) -> None:
    with pytest.raises(ValueError):
        Policy(per_worker=per_worker, min_workers=min_w, max_workers=max_w, max_surge=surge)


def _w(
    worker_id: str,
    state: str,
    started: float = NOW - 600,
    *,
    registered: bool | None = True,
    status: str = "ACTIVE",
    scene: int | None = None,
    heartbeat: float | None = 5.0,
    draining_since: float | None = None,
) -> WorkerView:
    return WorkerView(
        id=worker_id,
        state=state,
        started_at_s=started,
        registered=registered,
        server_status=status,
        current_scene=scene,
        heartbeat_age_s=heartbeat,
        draining_since_s=draining_since,
    )


POLICY = Policy(per_worker=5, min_workers=0, max_workers=4)


def _decide(backlog: int, fleet: list[WorkerView], policy: Policy = POLICY, **kwargs: object) -> Plan:
    return decide(NOW, backlog, fleet, policy, **kwargs)[0]  # type: ignore[arg-type]


# ---- scaling up --------------------------------------------------------------------------------------


def test_scale_up_starts_the_shortfall_at_once() -> None:
    assert _decide(12, []) == Plan(backlog=12, fleet=0, want=3, start=3, target=3)
    assert _decide(12, [_w("a", "busy", scene=1)]).start == 2


def test_booting_servers_count_as_capacity() -> None:
    """A slow boot must not trigger a second wave on every step."""
    booting = [_w(f"b{i}", "starting", NOW - 60, registered=False, status="BUILD") for i in range(3)]
    assert _decide(12, booting).start == 0


def test_unknown_workers_count_so_a_registry_outage_causes_no_burst() -> None:
    fleet = [_w("a", "unknown", registered=None), _w("b", "unknown", registered=None)]
    assert _decide(10, fleet).start == 0


def test_scale_up_is_bounded_by_surge_and_quota() -> None:
    surge = Policy(per_worker=1, min_workers=0, max_workers=20, max_surge=4)
    step = _decide(20, [], surge)
    assert step.start == 4 and "surge limited to 4" in step.reason
    step = _decide(20, [], surge, headroom=2)
    assert step.start == 2 and "quota admits 2 more" in step.reason
    assert _decide(20, [], surge, headroom=-3).start == 0, "an over-quota project boots nothing"


def test_a_draining_worker_is_replaced() -> None:
    step = _decide(5, [_w("a", "draining", draining_since=NOW - 10)])
    assert (step.fleet, step.start, step.actions) == (0, 1, ())


# ---- scaling down ------------------------------------------------------------------------------------


def test_scale_down_drains_only_idle_workers_oldest_first() -> None:
    fleet = [_w("new-idle", "idle", NOW - 30), _w("busy", "busy", NOW - 900, scene=7), _w("old-idle", "idle", NOW - 60)]
    step = _decide(0, fleet)
    assert step.drain == ["old-idle", "new-idle"] and step.delete == []
    assert "1 surplus worker(s) not idle" in step.reason
    assert _decide(5, fleet).drain == ["old-idle", "new-idle"]  # want 1: the busy one is it
    assert _decide(10, fleet).drain == ["old-idle"]


@pytest.mark.parametrize("state", ["busy", "unknown", "starting"])
def test_scale_down_never_picks_a_worker_not_known_to_be_idle(state: str) -> None:
    fleet = [_w("x", state, scene=1 if state == "busy" else None), _w("y", state, scene=1 if state == "busy" else None)]
    step = _decide(0, fleet)
    assert step.actions == () and step.start == 0
    assert str(step).endswith("no change (2 surplus worker(s) not idle; left running)")


def test_an_idle_row_that_still_names_a_scene_is_not_drained() -> None:
    """The heartbeat may lag the job: a scene on the row means busy, whatever the state says."""
    assert _decide(0, [_w("x", "idle", scene=3)]).drain == []


def test_scale_down_follows_the_highest_want_in_the_window() -> None:
    windowed = Policy(per_worker=5, min_workers=0, max_workers=4, scale_down_window_s=300)
    fleet = [_w("a", "idle", NOW - 30), _w("b", "idle", NOW - 20), _w("c", "idle", NOW - 10)]
    held, history = decide(NOW, 0, fleet, windowed, History(wants=((NOW - 200, 3), (NOW - 100, 1))))
    assert held.drain == [] and held.target == 3 and "held at 3 by the stabilisation window" in held.reason
    assert history.wants == ((NOW - 200, 3), (NOW - 100, 1), (NOW, 0))
    step, history = decide(NOW, 0, fleet, windowed, History(wants=((NOW - 400, 3), (NOW - 100, 2))))
    assert step.drain == ["a"] and step.target == 2
    assert history.wants == ((NOW - 100, 2), (NOW, 0)), "samples older than the window are forgotten"
    assert history.last_scale_s == NOW


def test_scale_down_waits_for_the_cooldown() -> None:
    cool = Policy(per_worker=5, min_workers=0, max_workers=4, cooldown_s=300)
    fleet = [_w("a", "idle")]
    step, history = decide(NOW, 0, fleet, cool, History(last_scale_s=NOW - 100))
    assert step.drain == [] and "cooldown for 200 s" in step.reason and history.last_scale_s == NOW - 100
    assert decide(NOW, 0, fleet, cool, History(last_scale_s=NOW - 301))[0].drain == ["a"]


def test_scale_up_ignores_window_and_cooldown_and_records_the_event() -> None:
    slow = Policy(per_worker=5, min_workers=0, max_workers=4, scale_down_window_s=900, cooldown_s=900)
    step, history = decide(NOW, 20, [], slow, History(wants=((NOW - 10, 0),), last_scale_s=NOW - 1))
    assert step.start == 4 and history.last_scale_s == NOW


# ---- reconcile ---------------------------------------------------------------------------------------


def test_servers_in_error_are_deleted_and_replaced() -> None:
    step = _decide(5, [_w("e", "starting", registered=False, status="ERROR")])
    assert step.delete == ["e"] and step.start == 1 and step.actions[0].why == "server in ERROR"


@pytest.mark.parametrize("status", ["SHUTOFF", "SUSPENDED", "SHELVED_OFFLOADED", "shutoff"])
def test_servers_stopped_for_good_are_deleted_and_replaced(status: str) -> None:
    step = _decide(5, [_w("off", "idle", status=status, heartbeat=400.0)])
    assert step.delete == ["off"] and step.start == 1 and step.actions[0].why == f"server in {status.upper()}"
    # BUILD, REBOOT, MIGRATING... are transitions, not deaths
    assert _decide(5, [_w("b", "starting", status="REBOOT")]).delete == []


def test_a_worker_whose_heartbeat_stopped_is_deleted_and_replaced() -> None:
    policy = Policy(per_worker=5, min_workers=0, max_workers=4, stale_heartbeat_s=300)
    hung_idle = _w("hung-idle", "idle", heartbeat=301.0)
    hung_busy = _w("hung-busy", "busy", scene=7, heartbeat=900.0)
    alive = _w("alive", "idle", heartbeat=299.0)
    step = _decide(15, [hung_idle, hung_busy, alive], policy)
    assert step.delete == ["hung-idle", "hung-busy"]
    assert step.actions[0].why == "no heartbeat for 301 s"
    assert (step.fleet, step.start) == (1, 2)
    # an unreadable registry tells nothing about heartbeats: nothing deleted on that account
    assert _decide(15, [_w("u", "unknown", heartbeat=None, registered=None)], policy).delete == []


def test_a_server_whose_worker_never_registered_is_deleted_after_the_boot_timeout() -> None:
    policy = Policy(per_worker=5, min_workers=0, max_workers=4, boot_timeout_s=600)
    young = _w("young", "starting", NOW - 599, registered=False, status="ACTIVE")
    old = _w("old", "starting", NOW - 601, registered=False, status="ACTIVE")
    step = _decide(10, [young, old], policy)
    assert step.delete == ["old"] and step.start == 1  # the young one still counts, the old one is replaced
    # unknown registry: nobody knows it never registered, so it is kept
    assert _decide(10, [_w("o", "unknown", NOW - 10_000, registered=None)], policy).delete == []
    # registered but still 'starting' (e.g. broker unreachable): not a boot failure
    assert _decide(10, [_w("r", "starting", NOW - 10_000)], policy).delete == []


def test_exited_workers_are_deleted() -> None:
    assert _decide(0, [_w("s", "stopped")]).delete == ["s"]


def test_a_drain_that_outlives_the_drain_timeout_is_deleted_unless_the_worker_is_still_busy() -> None:
    policy = Policy(per_worker=5, min_workers=0, max_workers=4, drain_timeout_s=900, stale_heartbeat_s=300)
    fresh = _w("fresh", "draining", draining_since=NOW - 100)
    late = _w("late", "draining", draining_since=NOW - 901)
    late_busy = _w("late-busy", "draining", draining_since=NOW - 901, scene=4, heartbeat=5.0)
    late_dead = _w("late-dead", "draining", draining_since=NOW - 901, scene=4, heartbeat=301.0)
    step = _decide(0, [fresh, late, late_busy, late_dead], policy)
    assert step.delete == ["late", "late-dead"]
    assert "late-busy not deleted" in step.reason


def test_workers_past_their_lifetime_are_drained_busy_or_not_and_replaced() -> None:
    policy = Policy(per_worker=5, min_workers=0, max_workers=4, max_lifetime_s=3600)
    fleet = [_w("old-busy", "busy", NOW - 4000, scene=1), _w("old-idle", "idle", NOW - 4000), _w("ok", "busy", scene=2)]
    step = _decide(15, fleet, policy)
    assert step.drain == ["old-busy", "old-idle"] and step.delete == []
    assert (step.fleet, step.start) == (1, 2), "the drained ones are replaced in the same step"


def test_an_error_server_with_a_live_busy_worker_is_not_deleted() -> None:
    step = _decide(0, [_w("e", "busy", status="ERROR", scene=9, heartbeat=2.0)])
    assert step.delete == [] and "e not deleted (server in ERROR): busy" in step.reason


# ---- invariants over random fleets --------------------------------------------------------------


STATES = ["starting", "idle", "busy", "draining", "stopped", "unknown"]


def _random_worker(rng: random.Random, i: int) -> WorkerView:
    state = rng.choice(STATES)
    registered = None if state == "unknown" else (rng.random() < 0.8 if state == "starting" else True)
    return _w(
        f"w{i}",
        state,
        NOW - rng.uniform(0, 200_000),
        registered=registered,
        status=rng.choice(["ACTIVE", "ACTIVE", "ACTIVE", "BUILD", "ERROR"]),
        scene=rng.choice([None, None, 7]) if state in ("busy", "draining", "idle", "unknown") else None,
        heartbeat=rng.choice([None, 1.0, 20.0, 400.0]),
        draining_since=NOW - rng.uniform(0, 2000) if state == "draining" else None,
    )


def test_invariants_hold_for_thousands_of_random_fleets() -> None:
    """Never delete a busy worker, never drain a busy one for surplus, never exceed surge, quota or max."""
    rng = random.Random(5)
    for _ in range(3000):
        policy = Policy(
            per_worker=rng.randint(1, 10),
            min_workers=(lo := rng.randint(0, 3)),
            max_workers=rng.randint(lo, 12),
            max_surge=rng.choice([None, 1, 4]),
            scale_down_window_s=rng.choice([0.0, 300.0]),
            cooldown_s=rng.choice([0.0, 300.0]),
            boot_timeout_s=900.0,
            max_lifetime_s=rng.choice([0.0, 86_400.0]),
            drain_timeout_s=900.0,
            stale_heartbeat_s=300.0,
        )
        fleet = [_random_worker(rng, i) for i in range(rng.randint(0, 10))]
        history = History(
            wants=tuple((NOW - rng.uniform(0, 600), rng.randint(0, 12)) for _ in range(rng.randint(0, 4))),
            last_scale_s=rng.choice([None, NOW - 50.0, NOW - 5000.0]),
        )
        headroom = rng.choice([None, 0, 2, 50])
        step, _ = decide(NOW, rng.randint(0, 80), fleet, policy, history, headroom)
        by_id = {w.id: w for w in fleet}
        for action in step.actions:
            w = by_id[action.worker_id]
            if action.kind == "delete":
                assert not is_busy(w, policy), (w, action)
            elif action.why.startswith("surplus"):
                assert w.state == "idle" and not is_busy(w, policy), (w, action)
        assert len({a.worker_id for a in step.actions}) == len(step.actions), "one action per worker"
        if policy.max_surge is not None:
            assert step.start <= policy.max_surge
        if headroom is not None:
            assert step.start <= headroom
        assert step.fleet + step.start <= max(policy.max_workers, step.fleet)
        capacity = sum(1 for w in fleet if w.state in CAPACITY_STATES)
        assert step.fleet <= capacity


# ---- the controller and its memory ---------------------------------------------------------------


class FakeDriver:
    def __init__(self, workers: list[WorkerView], admit: int = 100) -> None:
        self.workers = workers
        self.admit = admit
        self.calls: list[tuple[str, object]] = []

    def list_workers(self) -> list[WorkerView]:
        return list(self.workers)

    def start(self, n: int) -> list[str]:
        self.calls.append(("start", n))
        return [f"new{i}" for i in range(min(n, self.admit))]

    def drain(self, ids: list[str]) -> list[str]:
        self.calls.append(("drain", ids))
        return ids

    def delete(self, ids: list[str]) -> list[str]:
        self.calls.append(("delete", ids))
        return ids

    def down(self) -> list[str]:
        return self.drain([w.id for w in self.workers])

    def headroom(self) -> int | None:
        self.calls.append(("headroom", None))
        return None


def test_controller_applies_deletes_before_drains_before_starts_and_remembers(tmp_path: Path) -> None:
    clock = [NOW]
    store = FileHistory(tmp_path / "h.json")
    policy = Policy(per_worker=1, min_workers=0, max_workers=4, scale_down_window_s=300)
    driver = FakeDriver([_w("err", "starting", status="ERROR", registered=False), _w("ok", "idle")])
    controller = Controller(driver, policy, store, clock=lambda: clock[0])
    step, applied = controller.step(3)
    assert [c[0] for c in driver.calls] == ["headroom", "delete", "start"]
    assert (applied.deleted, applied.started) == (["err"], ["new0", "new1"])
    assert json.loads((tmp_path / "h.json").read_text()) == {"wants": [[NOW, 3]], "last_scale_s": NOW}
    # a new Controller (a restarted provisioner) keeps the window: backlog 0 does not drain yet
    driver.workers = [_w("ok", "idle"), _w("new0", "idle"), _w("new1", "idle")]
    clock[0] = NOW + 60
    step, _ = Controller(driver, policy, FileHistory(tmp_path / "h.json"), clock=lambda: clock[0]).step(0)
    assert step.drain == [] and step.target == 3


def test_dry_run_changes_nothing_and_records_nothing(tmp_path: Path) -> None:
    driver = FakeDriver([])
    store = FileHistory(tmp_path / "h.json")
    step, applied = Controller(driver, POLICY, store, clock=lambda: NOW).step(12, dry_run=True)
    assert step.start == 3 and applied.started == [] and ("start", 3) not in driver.calls
    assert not (tmp_path / "h.json").exists()


def test_a_start_the_cloud_refused_is_not_a_scale_event() -> None:
    """Otherwise a quota-exhausted project would hold off scale-down forever."""
    store = MemoryHistory(History(last_scale_s=NOW - 5000))
    Controller(FakeDriver([], admit=0), POLICY, store, clock=lambda: NOW).step(5)
    assert store.history.last_scale_s == NOW - 5000


def test_a_corrupt_history_file_is_an_empty_history(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text("{not json")
    assert FileHistory(path).load() == History()
    path.write_text("[1, 2]")
    assert FileHistory(path).load() == History()


def test_window_and_cooldown_default_per_driver() -> None:
    """Local processes cost nothing to restart (and `make demo` drains at once); VMs do."""
    local = Policy.from_settings(ProvisionSettings(driver="local"))
    assert (local.scale_down_window_s, local.cooldown_s) == (0.0, 0.0)
    cloud = Policy.from_settings(ProvisionSettings(driver="openstack"))
    assert (cloud.scale_down_window_s, cloud.cooldown_s) == (900.0, 300.0)
    explicit = Policy.from_settings(ProvisionSettings(driver="local", scale_down_window_s=60, cooldown_s=30))
    assert (explicit.scale_down_window_s, explicit.cooldown_s) == (60.0, 30.0)
