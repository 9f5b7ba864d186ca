"""The real control law and Controller against the simulated queue and fleet: the two arrival
patterns of docs/provisioning.md, a fleet that misbehaves, and negative controls showing that the
busy-kill and reversal metrics do catch a bad law."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from cbmflow.settings import ProvisionSettings
from provisioner import policy as policy_mod
from provisioner.cli import provision_app
from provisioner.policy import Action, Policy
from provisioner.simulate import SCENARIOS, Result, burst, simulate

# What `provision watch` runs with for VMs (the openstack driver's defaults), 20 workers at most.
PRODUCTION = Policy.from_settings(ProvisionSettings(driver="openstack", max_workers=20, per_worker=5))


@pytest.fixture(scope="module")
def runs() -> dict[str, Result]:
    return {name: simulate(SCENARIOS[name], PRODUCTION, seed=1) for name in ("daily", "backfill")}


@pytest.mark.parametrize("name", ["daily", "backfill"])
def test_every_job_is_done_without_a_busy_kill_or_a_reversal(runs: dict[str, Result], name: str) -> None:
    r = runs[name]
    assert r.done == r.jobs > 100
    assert r.busy_kills == 0
    assert r.reversals == 0, f"{name}: the fleet went down and up again within 10 minutes"
    assert r.peak_fleet <= 20
    assert r.scale_ups > 0 and r.scale_downs > 0
    assert r.fleet_timeline[-1][1] == 0, "scaled back to zero once the queue was empty"


def test_daily_passes_wait_little_and_cost_little(runs: dict[str, Result]) -> None:
    r = runs["daily"]
    assert r.wait_p95_s < 20 * 60
    # far below a fleet kept at its peak for the whole day
    assert r.vm_minutes < 0.25 * r.peak_fleet * 24 * 60


def test_a_backfill_fills_the_fleet_and_is_bounded_by_it(runs: dict[str, Result]) -> None:
    r = runs["backfill"]
    assert r.peak_fleet == 20
    # 3000+ jobs of ~136 s mean on 20 workers: about 5.7 h; the law must not leave capacity unused
    assert r.makespan_s < 25 * 3600
    busy_hours = r.jobs * 136 / 3600
    assert r.vm_minutes / 60 < busy_hours * 1.35, "VM time stays close to the work actually done"


def test_a_misbehaving_fleet_is_reconciled_without_killing_a_job() -> None:
    """A fifth of the servers go to ERROR, another fifth never register, workers are recycled hourly."""
    chaos = replace(SCENARIOS["backfill"], arrivals=burst(1000, 0.0), horizon_s=600.0, error_rate=0.2, stuck_rate=0.2)
    law = replace(PRODUCTION, max_lifetime_s=3600.0, boot_timeout_s=900.0)
    r = simulate(chaos, law, seed=3)
    assert r.done == r.jobs == 1000
    assert r.busy_kills == 0
    assert r.reconcile_deletes >= 5, "ERROR and never-registered servers were deleted"
    assert r.servers_started >= r.peak_fleet + r.reconcile_deletes + 10, "and replaced, as were the hourly recycles"


def test_the_quota_bounds_the_fleet() -> None:
    r = simulate(replace(SCENARIOS["backfill"], arrivals=burst(300, 0.0), horizon_s=600.0, quota=6), PRODUCTION)
    assert r.peak_fleet == 6 and r.done == 300 and r.busy_kills == 0


def test_negative_control_a_law_that_deletes_surplus_kills_busy_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the metric could not fail, 'zero busy kills' would prove nothing."""
    real = policy_mod.decide

    def reckless(*args: object, **kwargs: object) -> tuple[policy_mod.Plan, policy_mod.History]:
        plan, history = real(*args, **kwargs)  # type: ignore[arg-type]
        workers = args[2]
        assert isinstance(workers, list)
        surplus = plan.fleet - plan.target
        # like a naive scale-in that picks the oldest instances, busy or not
        victims = sorted((w for w in workers if w.state in ("busy", "idle")), key=lambda w: w.started_at_s)
        victims = [w.id for w in victims][: max(surplus, 0)]
        actions = tuple(Action("delete", i, "reckless") for i in victims)
        return replace(plan, actions=actions), history

    monkeypatch.setattr("provisioner.controller.decide", reckless)
    eager = replace(PRODUCTION, scale_down_window_s=0.0, cooldown_s=0.0)
    r = simulate(replace(SCENARIOS["daily"], arrivals=burst(200, 0.0), horizon_s=600.0), eager)
    assert r.busy_kills > 0


def test_negative_control_without_window_and_cooldown_a_thin_load_flaps() -> None:
    eager = replace(PRODUCTION, scale_down_window_s=0.0, cooldown_s=0.0)
    assert simulate(SCENARIOS["trickle"], eager).reversals > simulate(SCENARIOS["trickle"], PRODUCTION).reversals


def test_simulate_cli_reports_the_figures() -> None:
    result = CliRunner().invoke(provision_app, ["simulate", "-s", "daily", "--per-worker", "5", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["scenario"] == "daily" and row["busy kills"] == 0
    assert set(row) >= {"VM-minutes", "p95 wait (min)", "scale-ups", "scale-downs", "reversals"}
    bad = CliRunner().invoke(provision_app, ["simulate", "-s", "nope"])
    assert bad.exit_code == 2 and "unknown scenario" in bad.output
