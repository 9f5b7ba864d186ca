"""Worker pools without servers: settings parsing and refusals, the queues that drive each pool,
the job kinds in its workers' user-data (read back by the worker's own settings parser), one step
of several pools over fake fleets, and a pool's own per-job cost in the simulator."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from cbmflow.errors import CbmflowError, ConfigError
from cbmflow.settings import ProvisionSettings, WorkerSettings
from provisioner import pools as poolsmod
from provisioner import service
from provisioner.cli import provision_app
from provisioner.policy import Policy, WorkerView
from provisioner.simulate import custom, simulate
from provisioner.userdata import ENV_PATH, UNIT_PATH, parse_worker_launch

TWO_POOLS = [
    {"name": "extract", "job_kinds": ["ExtractParcels"], "max_workers": 20},
    {"name": "card", "job_kinds": ["GenerateCard"], "flavor": "eo.16c64g", "per_worker": 1, "max_workers": 3,
     "worker_env": {"CBMFLOW_WORKER_STOP_DEADLINE_S": "1800"}},
]  # fmt: skip


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("CBMFLOW_PROVISION_POOLS", "CBMFLOW_WORKER_JOB_KINDS", "CBMFLOW_BUS_CARD_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CBMFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CBMFLOW_DB_DSN", "postgresql://w:pw@db.internal/cbm")
    monkeypatch.setenv("CBMFLOW_BUS_AMQP_URL", "amqp://w:pw@mq.internal/cbm")
    monkeypatch.setenv("CBMFLOW_PROVISION_FLAVOR", "eo.4c8g")
    monkeypatch.setenv("CBMFLOW_PROVISION_PER_WORKER", "5")
    return monkeypatch


# ---- settings --------------------------------------------------------------------------------------


def test_without_pools_the_flat_settings_are_one_pool_on_both_queues(env: pytest.MonkeyPatch) -> None:
    [pool] = poolsmod.resolve(ProvisionSettings())
    assert (pool.name, pool.job_kinds, pool.queues) == (
        "default",
        ("ExtractParcels", "GenerateCard"),
        ("cbmflow.extract", "cbmflow.card"),
    )
    assert pool.settings.flavor == "eo.4c8g" and pool.settings.per_worker == 5


def test_pools_from_the_environment_inherit_what_they_leave_out(env: pytest.MonkeyPatch) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(TWO_POOLS))
    env.setenv("CBMFLOW_PROVISION_MIN_WORKERS", "1")
    env.setenv("CBMFLOW_BUS_CARD_QUEUE", "eu.card")
    extract, card = poolsmod.resolve(ProvisionSettings())
    assert (extract.name, extract.queues, card.name, card.queues) == (
        "extract",
        ("cbmflow.extract",),
        "card",
        ("eu.card",),
    )
    # its own keys win; the rest are the CBMFLOW_PROVISION_* values
    assert (card.settings.flavor, card.settings.per_worker, card.settings.max_workers) == ("eo.16c64g", 1, 3)
    assert (extract.settings.flavor, extract.settings.per_worker, extract.settings.max_workers) == ("eo.4c8g", 5, 20)
    assert extract.settings.min_workers == card.settings.min_workers == 1
    assert card.settings.worker_env == {"CBMFLOW_WORKER_STOP_DEADLINE_S": "1800"} and extract.settings.worker_env == {}
    assert Policy.from_settings(card.settings) != Policy.from_settings(extract.settings)
    assert poolsmod.unserved_kinds([extract, card]) == []
    assert poolsmod.unserved_kinds([extract]) == ["GenerateCard"]
    assert [p.name for p in poolsmod.select([extract, card], ["card"])] == ["card"]
    with pytest.raises(ConfigError, match="no such pool: gpu"):
        poolsmod.select([extract, card], ["gpu"])


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        ([{"name": "a", "job_kinds": ["GenerateCard"]}, {"name": "a", "job_kinds": ["ExtractParcels"]}], "unique"),
        ([{"name": "a", "job_kinds": ["GenerateCard"]}, {"name": "b", "job_kinds": ["GenerateCard"]}], "pools a and b"),
        ([{"name": "a", "job_kinds": ["GenerateCard"], "flavour": "x"}], "Extra inputs"),
        ([{"name": "Card_1", "job_kinds": ["GenerateCard"]}], "pattern"),
        ([{"name": "a", "job_kinds": []}], "at least 1"),
    ],
)  # fmt: skip
def test_nonsense_pools_are_refused_when_the_settings_are_read(
    env: pytest.MonkeyPatch, pools: list[dict[str, object]], message: str
) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(pools))
    with pytest.raises(ValidationError, match=message):
        ProvisionSettings()


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"name": "a", "job_kinds": ["GenerateCARD"]}, "unknown job kind"),
        ({"name": "a", "job_kinds": ["GenerateCard"], "min_workers": 4, "max_workers": 2}, "pool a: need 0 <= min"),
        ({"name": "a", "job_kinds": ["GenerateCard"], "worker_env": {"CBMFLOW_WORKER_JOB_KINDS": "[]"}}, "may not set"),
    ],
)  # fmt: skip
def test_a_pool_the_provisioner_cannot_run_is_a_config_error_naming_it(
    env: pytest.MonkeyPatch, pool: dict[str, object], message: str
) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps([pool]))
    with pytest.raises(ConfigError, match=message):
        poolsmod.resolve(ProvisionSettings())


# ---- user-data -------------------------------------------------------------------------------------


def test_each_pools_user_data_carries_its_job_kinds_for_the_workers_own_parser(env: pytest.MonkeyPatch) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(TWO_POOLS))
    # what the provisioner's own environment says about job kinds never reaches a pool's workers
    env.setenv("CBMFLOW_WORKER_JOB_KINDS", '["ExtractParcels","GenerateCard"]')
    extract, card = poolsmod.resolve(ProvisionSettings())
    seen = {}
    for pool in (extract, card):
        name = f"cbmflow-{pool.name}-0a1b2c3d"
        text = service.server_userdata(pool.settings, name)
        vm_env, _ = parse_worker_launch(text)
        assert vm_env["CBMFLOW_WORKER_ID"] == name
        # the worker reads its kinds with its own settings class, from exactly this environment
        with pytest.MonkeyPatch.context() as mp:
            for key, value in vm_env.items():
                mp.setenv(key, value)
            seen[pool.name] = WorkerSettings().job_kinds
        units = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
        seen[f"{pool.name} stop"] = [ln for ln in units[UNIT_PATH].splitlines() if ln.startswith("TimeoutStopSec=")]
        assert "CBMFLOW_WORKER_JOB_KINDS='[" in units[ENV_PATH]
    assert seen == {
        "extract": ["ExtractParcels"],
        "card": ["GenerateCard"],
        # the card pool's own stop deadline (1800 s) reaches systemd's stop timeout (+60 s slack)
        "extract stop": ["TimeoutStopSec=660"],
        "card stop": ["TimeoutStopSec=1860"],
    }


def test_each_pools_local_driver_owns_only_its_own_worker_ids(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(TWO_POOLS))
    extract, card = poolsmod.resolve(ProvisionSettings())
    drivers = [service.make_driver(p.settings) for p in (extract, card)]
    workers = tmp_path / "state" / "workers"
    workers.mkdir(parents=True)
    assert [d.pool for d in drivers] == ["extract", "card"]  # type: ignore[attr-defined]
    owns = [[d.owns(w) for w in ("local-0a1b2c3d", "local-card-0a1b2c3d", "local-extract-0a1b2c3d",  # type: ignore[attr-defined]
                                 "local-card-x-0a1b2c3d")] for d in drivers]  # fmt: skip
    assert owns == [[False, False, True, False], [False, True, False, False]]


# ---- one step of several pools ---------------------------------------------------------------------


class Fleet:
    """The driver port over a list: records what the step asked of it."""

    def __init__(self, name: str, workers: list[WorkerView] | None = None, broken: bool = False) -> None:
        self.name, self.workers, self.broken = name, list(workers or []), broken
        self.started: list[int] = []
        self.drained: list[str] = []

    def list_workers(self) -> list[WorkerView]:
        if self.broken:
            raise CbmflowError("cannot list worker servers: 503")
        return list(self.workers)

    def start(self, n: int) -> list[str]:
        self.started.append(n)
        ids = [f"{self.name}-{len(self.workers) + i}" for i in range(n)]
        self.workers += [WorkerView(id=i, state="starting") for i in ids]
        return ids

    def drain(self, ids: list[str]) -> list[str]:
        self.drained += ids
        return ids

    def delete(self, ids: list[str]) -> list[str]:
        return ids

    def down(self) -> list[str]:
        return self.drain([w.id for w in self.workers])

    def headroom(self) -> int | None:
        return None


def test_jobs_in_the_card_queue_grow_only_the_card_pool_and_a_broken_pool_stops_no_other(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(TWO_POOLS))
    idle = WorkerView(id="extract-old", state="idle", heartbeat_age_s=1.0, registered=True)
    fleets = {"extract": Fleet("extract", [idle]), "card": Fleet("card")}
    steps = service.scale_pools(drivers=fleets, backlogs={"extract": 0, "card": 7})
    plans = {s.pool.name: s.plan for s in steps}
    assert plans["card"] is not None and plans["extract"] is not None
    # card: ceil(7 / 1) = 7, clamped to its max 3; extract: nothing queued, its idle worker drains
    assert (plans["card"].want, fleets["card"].started) == (3, [3])
    assert (plans["extract"].want, fleets["extract"].started, fleets["extract"].drained) == (0, [], ["extract-old"])
    # the same backlog as extraction work: 7 / 5 -> 2 workers of the other pool, the card pool alone
    fleets = {"extract": Fleet("extract"), "card": Fleet("card")}
    service.scale_pools(drivers=fleets, backlogs={"extract": 7, "card": 0})
    assert (fleets["extract"].started, fleets["card"].started) == ([2], [])
    # one pool's cloud away: the other is still stepped, and the failure is reported
    fleets = {"extract": Fleet("extract", broken=True), "card": Fleet("card")}
    steps = service.scale_pools(drivers=fleets, backlogs={"extract": 9, "card": 2})
    assert [(s.pool.name, s.plan is None, "503" in s.error) for s in steps] == [
        ("extract", True, True),
        ("card", False, False),
    ]
    assert fleets["card"].started == [2]


def test_scale_once_with_several_pools_returns_their_sum_and_refuses_one_pool_overrides(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(TWO_POOLS))
    with pytest.raises(ConfigError, match="needs one pool"):
        service.scale_once(backlog=3)
    with pytest.raises(ConfigError, match="2 pools are configured"):
        service.run_step(ProvisionSettings(), backlog=3, driver=Fleet("x"))
    fleets = {"extract": Fleet("extract"), "card": Fleet("card")}
    env.setattr(service, "current_backlog", lambda queues: {("cbmflow.extract",): 11, ("cbmflow.card",): 2}[queues])
    env.setattr(service, "make_driver", lambda settings: fleets[settings.pool])
    plan = service.scale_once(dry_run=True)
    assert (plan.backlog, plan.want, plan.start) == (13, 3 + 2, 5)
    assert "extract: backlog 11" in plan.reason and "card: backlog 2" in plan.reason
    assert fleets["extract"].started == fleets["card"].started == [], "a dry run starts nothing"


# ---- a pool's own cost in the simulator ------------------------------------------------------------


def test_a_card_pool_is_simulated_with_its_own_job_time() -> None:
    """Work done must match the log-normal's analytic mean (median · e^(σ²/2)), not the code's own sums."""
    median_s, sigma, jobs = 900.0, 0.5, 200
    load = custom(burst_jobs=jobs, hours=1.0, job_median_s=median_s, job_sigma=sigma)
    card = Policy(per_worker=1, min_workers=0, max_workers=10, max_surge=4, scale_down_window_s=900, cooldown_s=300)
    r = simulate(load, card, seed=5)
    assert r.done == r.jobs == jobs and r.busy_kills == 0 and r.peak_fleet == 10
    expected_min = jobs * median_s * math.exp(sigma**2 / 2) / 60
    assert r.work_minutes == pytest.approx(expected_min, rel=0.12)
    assert r.work_minutes < r.vm_minutes and 0.8 < r.utilisation < 1.0, "boots and the window cost a little"
    # 10 workers: the makespan is about the work over 10, plus a boot
    assert r.makespan_s / 60 == pytest.approx(expected_min / 10, rel=0.3)


def test_a_national_arrival_rate_keeps_its_poisson_count() -> None:
    load = custom(rate_per_h=6000.0, hours=2.0)
    counts = [len(load.arrivals(random.Random(seed))) for seed in range(3)]
    # 12 000 expected, Poisson sd ~110: never the underflowed product's nonsense
    assert all(abs(c - 12_000) < 600 for c in counts), counts


def test_simulate_cli_takes_a_configured_pools_law(env: pytest.MonkeyPatch) -> None:
    env.setenv("CBMFLOW_PROVISION_POOLS", json.dumps(TWO_POOLS))
    args = ["simulate", "--pool", "card", "--burst", "12", "--hours", "0.5", "--job-median", "600", "--json"]
    result = CliRunner().invoke(provision_app, args)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["scenario"], row["per_worker"], row["jobs"], row["busy kills"]) == ("custom", 1, 12, 0)
    assert row["peak fleet"] == 3, "the card pool's max_workers"
    bad = CliRunner().invoke(provision_app, ["simulate", "--pool", "gpu", "--burst", "1"])
    assert bad.exit_code == 2 and "no such pool" in bad.output
