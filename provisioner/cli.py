"""``cbmflow provision``: scale workers by queue depth, show and drain the fleet, operate on VMs.

``scale`` is one idempotent control step (read backlog, list workers, decide, apply) meant to be
run every 30-60 s by a timer; ``watch`` is the same step in a loop, for a daemon. Neither keeps
state of its own beyond what the driver records on the servers and a small history file (the
stabilisation window), so a crashed or restarted provisioner simply carries on.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import typer

from cbmflow.errors import CbmflowError, InvalidInputError
from cbmflow.logging import get_logger
from cbmflow.settings import ProvisionSettings
from provisioner.controller import Applied
from provisioner.drivers import WorkerDriver
from provisioner.policy import Plan, Policy, WorkerView
from provisioner.service import (
    base_config,
    make_driver,
    run_step,
    wait_down,
)

log = get_logger("provisioner")

provision_app = typer.Typer(help="Scale workers by queue depth: local processes or OpenStack VMs.")


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plan_tables(step: Plan, applied: Applied | None, dry_run: bool) -> list[Any]:
    from rich.table import Table

    summary = Table(title="scaling plan" + (" (dry run)" if dry_run else ""))
    for col in ("backlog", "fleet", "want", "window target", "start", "drain", "delete", "note"):
        summary.add_column(col)
    summary.add_row(
        str(step.backlog),
        str(step.fleet),
        str(step.want),
        str(step.target),
        str(step.start),
        str(len(step.drain)),
        str(len(step.delete)),
        step.reason,
    )
    tables = [summary]
    if step.actions or step.start:
        actions = Table(title="actions")
        for col in ("action", "worker", "why"):
            actions.add_column(col)
        for a in step.actions:
            actions.add_row(a.kind, a.worker_id, a.why)
        for worker_id in applied.started if applied else []:
            actions.add_row("start", worker_id, f"want {step.want}")
        if dry_run and step.start:
            actions.add_row("start", f"({step.start} new)", f"want {step.want}")
        tables.append(actions)
    return tables


def _settings(**overrides: Any) -> ProvisionSettings:
    return ProvisionSettings().model_copy(update={k: v for k, v in overrides.items() if v is not None})


@provision_app.command("scale")
def scale_cmd(
    min_workers: int | None = typer.Option(
        None, "--min", help="Fewest workers (default: CBMFLOW_PROVISION_MIN_WORKERS)."
    ),
    max_workers: int | None = typer.Option(
        None, "--max", help="Most workers (default: CBMFLOW_PROVISION_MAX_WORKERS)."
    ),
    per_worker: int | None = typer.Option(
        None, "--per-worker", help="Backlog one worker absorbs (default: CBMFLOW_PROVISION_PER_WORKER)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; start, drain and delete nothing."),
) -> None:
    """One control step: want = clamp(ceil(backlog / per-worker), min, max); boot now, drain idle after the window."""
    from rich.console import Console

    settings = _settings(min_workers=min_workers, max_workers=max_workers, per_worker=per_worker)
    try:
        step, applied = run_step(settings, dry_run=dry_run)
    except Exception as exc:  # noqa: BLE001 - config, broker, cloud and management API errors come in many types
        raise _fail(exc) from exc
    console = Console()
    for table in _plan_tables(step, applied, dry_run):
        console.print(table)
    if not dry_run and step.start and len(applied.started) < step.start:
        console.print(f"[yellow]started {len(applied.started)} of {step.start}: see the log (quota or API error)")


@provision_app.command("watch")
def watch_cmd(
    interval_s: float | None = typer.Option(
        None, "--interval", help="Seconds between steps (default: CBMFLOW_PROVISION_INTERVAL_S)."
    ),
    iterations: int = typer.Option(0, "--iterations", help="Stop after this many steps (0 = until SIGTERM)."),
) -> None:
    """The control loop, for a daemon: one step every interval; a failed step is logged and retried."""
    settings = _settings(interval_s=interval_s)
    stop = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True
        log.info("provision.watch_stopping", signal=signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        driver = make_driver(settings)
    except CbmflowError as exc:
        raise _fail(exc) from exc
    steps = 0
    while not stop:
        began = time.monotonic()
        try:
            run_step(settings, driver=driver)
        except Exception as exc:  # noqa: BLE001 - a broker or cloud outage must not end the daemon
            log.error("provision.step_failed", error=f"{type(exc).__name__}: {exc}"[:500])
        steps += 1
        if iterations and steps >= iterations:
            break
        while not stop and time.monotonic() - began < settings.interval_s:
            time.sleep(min(0.5, settings.interval_s))


def _fleet(settings: ProvisionSettings | None = None) -> tuple[WorkerDriver, list[WorkerView]]:
    driver = make_driver(settings or ProvisionSettings())
    return driver, driver.list_workers()


@provision_app.command("status")
def status_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The fleet: each server, its status and age, the worker's registry state and current job."""
    from rich.console import Console
    from rich.table import Table

    try:
        _, workers = _fleet()
    except CbmflowError as exc:
        raise _fail(exc) from exc
    now = time.time()
    if as_json:
        typer.echo(json.dumps([w.__dict__ for w in workers], indent=2))
        return
    table = Table(title=f"workers ({len(workers)})")
    for col in ("server", "status", "age", "worker", "job (scene)", "heartbeat", "address / log"):
        table.add_column(col)
    for w in workers:
        table.add_row(
            w.id,
            w.server_status,
            _age(now - w.started_at_s) if w.started_at_s else "",
            w.state,
            str(w.current_scene or ""),
            f"{w.heartbeat_age_s:.0f} s ago" if w.heartbeat_age_s is not None else "",
            w.address or w.detail,
        )
    Console().print(table)


@provision_app.command("drain")
def drain_cmd(
    servers: list[str] = typer.Argument(None, help="Worker ids / server names (see `provision status`)."),
    all_: bool = typer.Option(False, "--all", help="Drain every worker."),
) -> None:
    """Ask workers to finish (or requeue) their current job and exit; `scale` deletes them once stopped."""
    if bool(servers) == all_:
        raise _fail(InvalidInputError("name the servers to drain, or pass --all"))
    try:
        driver, workers = _fleet()
        known = {w.id for w in workers}
        if not all_:
            unknown = sorted(set(servers) - known)
            if unknown:
                raise InvalidInputError(f"no such worker: {', '.join(unknown)}")
        drained = driver.down() if all_ else driver.drain(list(servers))
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.echo(f"draining {len(drained)} worker(s){': ' + ', '.join(drained) if drained else ''}")


@provision_app.command("down")
def down_cmd(
    wait_s: float = typer.Option(0.0, "--wait", help="Seconds to wait for the workers to stop (0 = don't wait)."),
) -> None:
    """Drain every worker: each finishes (or requeues) its current job and exits; with --wait, remove them."""
    try:
        driver = make_driver(ProvisionSettings())
        drained = driver.down()
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.echo(f"draining {len(drained)} worker(s){': ' + ', '.join(drained) if drained else ''}")
    if wait_s > 0:
        left = wait_down(driver, wait_s)
        if left:
            typer.echo(f"still running after {wait_s:.0f} s: {', '.join(left)}")
            raise typer.Exit(1)
        typer.echo("all stopped")


@provision_app.command("render-userdata")
def render_userdata_cmd(
    install: str | None = typer.Option(
        None, "--install", help="preinstalled | wheel | index (default: CBMFLOW_PROVISION_INSTALL; wheel if a URL)."
    ),
    wheel_url: str | None = typer.Option(None, "--wheel-url", help="Wheel URL (default: CBMFLOW_PROVISION_WHEEL_URL)."),
    index_url: str | None = typer.Option(None, "--index-url", help="Package index for install=index (default: PyPI)."),
    local: bool = typer.Option(False, "--local", help="The variant the local driver starts (this venv's worker)."),
    example: bool = typer.Option(
        False, "--example", help="Placeholder values (cloud-init/*.example.yaml); --install picks the variant."
    ),
) -> None:
    """Print the worker's #cloud-config user-data to stdout (it contains secrets)."""
    from provisioner.drivers.local import local_worker_command
    from provisioner.userdata import example_userdata, render_userdata, resolve_install, worker_env

    if example:
        try:
            sys.stdout.write(example_userdata(resolve_install(install or "wheel", "")))
        except CbmflowError as exc:
            raise _fail(exc) from exc
        return
    settings = ProvisionSettings()
    url = settings.wheel_url if wheel_url is None else wheel_url
    try:
        mode = resolve_install(settings.install if install is None else install, url)
        text = render_userdata(
            worker_env(),
            install=mode,
            wheel_url=url,
            index_url=settings.index_url if index_url is None else index_url,
            worker_command=local_worker_command() if local else None,
            base_config=base_config(settings),
        )
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.secho(
        "warning: this user-data contains the database and broker credentials; keep it out of logs and tickets",
        fg=typer.colors.YELLOW,
        err=True,
    )
    sys.stdout.write(text)


def _worker(server: str) -> tuple[ProvisionSettings, WorkerView]:
    settings = ProvisionSettings()
    _, workers = _fleet(settings)
    for w in workers:
        if server in (w.id, w.server_id):
            return settings, w
    raise InvalidInputError(f"no such worker: {server}")


def _ssh(settings: ProvisionSettings, worker: WorkerView) -> Any:
    from provisioner import ssh

    if not worker.address:
        raise InvalidInputError(f"{worker.id} has no address yet (status {worker.server_status})")
    return ssh.connection(settings, worker.address)


@provision_app.command("logs")
def logs_cmd(
    server: str = typer.Argument(..., help="Worker id / server name or id."),
    lines: int = typer.Option(200, "--lines", "-n", help="Last lines to show."),
    boot: bool = typer.Option(False, "--boot", help="cloud-init's output (install and boot) instead of the worker's."),
) -> None:
    """The worker's log: its file for local workers, its journal over SSH (Fabric) for VMs."""
    from provisioner import ssh

    try:
        settings, worker = _worker(server)
        if settings.driver == "local":
            text = Path(worker.detail).read_text(errors="replace")
            typer.echo("\n".join(text.splitlines()[-lines:]))
            return
        result = _ssh(settings, worker).run(ssh.logs_command(lines, boot, settings.ssh_user), hide=False, warn=True)
    except (CbmflowError, OSError) as exc:
        raise _fail(exc) from exc
    raise typer.Exit(result.exited)


@provision_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    server: str = typer.Argument(..., help="Worker id / server name or id."),
    command: list[str] = typer.Argument(..., help="Command to run on the VM (quote it, or put it after --)."),
) -> None:
    """Run a command on a worker VM over SSH (Fabric); exits with its exit status."""
    import shlex

    try:
        settings, worker = _worker(server)
        if settings.driver == "local":
            raise InvalidInputError("local workers are processes on this machine: run the command here")
        line = command[0] if len(command) == 1 else shlex.join(command)
        result = _ssh(settings, worker).run(line, hide=False, warn=True)
    except (CbmflowError, OSError) as exc:
        raise _fail(exc) from exc
    raise typer.Exit(result.exited)


@provision_app.command("simulate")
def simulate_cmd(
    scenario: list[str] = typer.Option(
        None, "--scenario", "-s", help="daily | backfill | trickle (repeatable; default: daily and backfill)."
    ),
    per_worker: list[int] = typer.Option(None, "--per-worker", help="Backlog per worker (repeatable; default: 5)."),
    max_workers: int = typer.Option(20, "--max", help="Most workers."),
    min_workers: int = typer.Option(0, "--min", help="Fewest workers."),
    window_s: float = typer.Option(900.0, "--window", help="Scale-down stabilisation window (s)."),
    cooldown_s: float = typer.Option(300.0, "--cooldown", help="Scale-down cooldown after a scale event (s)."),
    boot_delay_s: float = typer.Option(180.0, "--boot-delay", help="Seconds from boot to a registered worker."),
    job_median_s: float = typer.Option(120.0, "--job-median", help="Median job duration (s), log-normal."),
    seed: int = typer.Option(1, "--seed", help="Random seed (arrivals, durations, boot jitter)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Run the real control law against a simulated queue and VM fleet; report cost, waits, scale events."""
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from provisioner.simulate import SCENARIOS, simulate

    names = scenario or ["daily", "backfill"]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise _fail(InvalidInputError(f"unknown scenario {', '.join(unknown)}; use {', '.join(SCENARIOS)}"))
    rows = []
    for name in names:
        sc = replace(SCENARIOS[name], boot_delay_s=boot_delay_s, job_median_s=job_median_s)
        for k in per_worker or [5]:
            policy = Policy(
                per_worker=k,
                min_workers=min_workers,
                max_workers=max_workers,
                max_surge=4,
                scale_down_window_s=window_s,
                cooldown_s=cooldown_s,
            )
            rows.append(simulate(sc, policy, seed=seed).row())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"simulation: max {max_workers}, window {window_s:.0f} s, cooldown {cooldown_s:.0f} s")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(provision_app, name="provision")
