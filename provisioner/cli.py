"""``cbmflow provision``: scale workers by queue depth, show and drain the fleet, operate on VMs.

``scale`` is one idempotent control step per pool (read its queues' backlog, list its workers,
decide, apply) meant to be run every 30-60 s by a timer; ``watch`` is the same steps in a loop,
for a daemon. Neither keeps state of its own beyond what the driver records on the servers and a
small history file per pool (the stabilisation window), so a crashed or restarted provisioner
simply carries on. Every command acts on every pool unless ``--pool`` names some.
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
from provisioner import pools as poolsmod
from provisioner import service
from provisioner.policy import Policy, WorkerView
from provisioner.service import (
    PoolStep,
    base_config,
    make_driver,
    run_step,
    wait_down,
)

log = get_logger("provisioner")

provision_app = typer.Typer(help="Scale workers by queue depth, one pool per queue: local processes or OpenStack VMs.")

POOL_OPTION_HELP = "Only this pool (repeatable; default: every pool, see CBMFLOW_PROVISION_POOLS)."


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plan_tables(steps: list[PoolStep], dry_run: bool) -> list[Any]:
    from rich.table import Table

    summary = Table(title="scaling plan" + (" (dry run)" if dry_run else ""))
    for col in ("pool", "queues", "backlog", "fleet", "want", "window target", "start", "drain", "delete", "note"):
        summary.add_column(col)
    actions = Table(title="actions")
    for col in ("pool", "action", "worker", "why"):
        actions.add_column(col)
    for ps in steps:
        name, queues, step, applied = ps.pool.name, ", ".join(ps.pool.queues), ps.plan, ps.applied
        if step is None:
            summary.add_row(name, queues, "", "", "", "", "", "", "", f"[red]step failed: {ps.error}[/red]")
            continue
        summary.add_row(
            name,
            queues,
            str(step.backlog),
            str(step.fleet),
            str(step.want),
            str(step.target),
            str(step.start),
            str(len(step.drain)),
            str(len(step.delete)),
            step.reason,
        )
        for a in step.actions:
            actions.add_row(name, a.kind, a.worker_id, a.why)
        for worker_id in applied.started if applied else []:
            actions.add_row(name, "start", worker_id, f"want {step.want}")
        if dry_run and step.start:
            actions.add_row(name, "start", f"({step.start} new)", f"want {step.want}")
    return [summary, actions] if actions.row_count else [summary]


def _settings(**overrides: Any) -> ProvisionSettings:
    return ProvisionSettings().model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _pools(names: list[str] | None, settings: ProvisionSettings | None = None) -> list[poolsmod.Pool]:
    return poolsmod.select(poolsmod.resolve(settings or ProvisionSettings()), names)


def _orphans(*, reap: bool, driver: Any = None) -> list[WorkerView]:
    """The workers of no configured pool (deleting the stopped ones when ``reap``). A failure to
    list them is logged and never fails the pools' own step."""
    try:
        if reap:
            return service.reap_orphans(driver=driver)
        return (driver or service.orphan_driver()).list_workers()
    except Exception as exc:  # noqa: BLE001 - cloud and registry errors come in many types
        log.warning("provision.orphans_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
        return []


def _orphans_hint(orphans: list[WorkerView]) -> str:
    pools = ", ".join(sorted({w.pool or "?" for w in orphans}))
    return (
        f"{len(orphans)} worker(s) of pools no longer configured ({pools}): no step scales them;"
        " `cbmflow provision down --orphans` drains them and the next step deletes them once stopped"
    )


@provision_app.command("scale")
def scale_cmd(
    min_workers: int | None = typer.Option(
        None, "--min", help="Fewest workers (default: the pool's min_workers, CBMFLOW_PROVISION_MIN_WORKERS)."
    ),
    max_workers: int | None = typer.Option(
        None, "--max", help="Most workers (default: the pool's max_workers, CBMFLOW_PROVISION_MAX_WORKERS)."
    ),
    per_worker: int | None = typer.Option(
        None,
        "--per-worker",
        help="Backlog one worker absorbs (default: the pool's per_worker, CBMFLOW_PROVISION_PER_WORKER).",
    ),
    pool: list[str] = typer.Option(None, "--pool", help=POOL_OPTION_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; start, drain and delete nothing."),
) -> None:
    """One control step per pool: want = clamp(ceil(backlog / per-worker), min, max) on the pool's own
    queues; boot now, drain idle after the window. --min/--max/--per-worker need one pool."""
    from rich.console import Console

    overrides = {"min_workers": min_workers, "max_workers": max_workers, "per_worker": per_worker}
    try:
        selected = _pools(pool)
        if any(v is not None for v in overrides.values()):
            if len(selected) != 1:
                names = ", ".join(p.name for p in selected)
                raise InvalidInputError(f"--min, --max and --per-worker change one pool: name it with --pool ({names})")
            [one] = selected
            step, applied = run_step(
                one.settings.model_copy(update={k: v for k, v in overrides.items() if v is not None}), dry_run=dry_run
            )
            steps = [PoolStep(one, step, applied)]
        else:
            steps = service.scale_pools(dry_run=dry_run, names=[p.name for p in selected])
    except Exception as exc:  # noqa: BLE001 - config, broker, cloud and management API errors come in many types
        raise _fail(exc) from exc
    console = Console()
    for table in _plan_tables(steps, dry_run):
        console.print(table)
    orphans = [] if pool else _orphans(reap=not dry_run)
    if orphans:
        console.print(f"[yellow]{_orphans_hint(orphans)}[/yellow]")
    for ps in steps:
        if not dry_run and ps.plan and ps.applied and ps.plan.start and len(ps.applied.started) < ps.plan.start:
            console.print(
                f"[yellow]pool {ps.pool.name}: started {len(ps.applied.started)} of {ps.plan.start}:"
                " see the log (quota or API error)"
            )
    if any(ps.error for ps in steps):
        raise typer.Exit(2)


@provision_app.command("watch")
def watch_cmd(
    interval_s: float | None = typer.Option(
        None, "--interval", help="Seconds between steps (default: CBMFLOW_PROVISION_INTERVAL_S)."
    ),
    iterations: int = typer.Option(0, "--iterations", help="Stop after this many steps (0 = until SIGTERM)."),
    pool: list[str] = typer.Option(None, "--pool", help=POOL_OPTION_HELP),
) -> None:
    """The control loop, for a daemon: one step of every pool every interval; a failed step is logged
    and retried, and never stops the other pools' steps."""
    settings = _settings(interval_s=interval_s)
    stop = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True
        log.info("provision.watch_stopping", signal=signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        selected = _pools(pool, settings)
        # One driver per pool for the daemon's life: it caches the cloud connection and lookups.
        drivers = {p.name: make_driver(p.settings) for p in selected}
        orphan_driver = None if pool else service.orphan_driver(settings)
    except CbmflowError as exc:
        raise _fail(exc) from exc
    unserved = poolsmod.unserved_kinds(poolsmod.resolve(settings))
    if unserved:
        log.warning("provision.kinds_without_pool", job_kinds=unserved)
    steps = 0
    while not stop:
        began = time.monotonic()
        service.scale_pools(settings, names=list(drivers), drivers=drivers)
        if orphan_driver is not None:
            _orphans(reap=True, driver=orphan_driver)
        steps += 1
        if iterations and steps >= iterations:
            break
        while not stop and time.monotonic() - began < settings.interval_s:
            time.sleep(min(0.5, settings.interval_s))


@provision_app.command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: {pools: [...], workers: [...]}."),
    pool: list[str] = typer.Option(None, "--pool", help=POOL_OPTION_HELP),
) -> None:
    """Each pool (its queues, backlog, the law's want, workers running, booting and draining), then
    each server: its pool, status and age, the worker's registry state and current job."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    try:
        statuses = service.pool_status(names=pool)
        unserved = poolsmod.unserved_kinds(poolsmod.resolve(ProvisionSettings()))
    except CbmflowError as exc:
        raise _fail(exc) from exc
    orphans = [] if pool else _orphans(reap=False)
    now = time.time()
    if as_json:
        out = {
            "pools": [st.summary() for st in statuses],
            "workers": [{**w.__dict__, "pool": st.pool.name} for st in statuses for w in st.workers],
            "orphans": [w.__dict__ for w in orphans],
            "unserved_job_kinds": unserved,
        }
        typer.echo(json.dumps(out, indent=2))
        return
    console = Console()
    pools_table = Table(title=f"pools ({len(statuses)})")
    for col in ("pool", "job kinds", "queues", "backlog", "want", "running", "busy", "booting", "draining", "bounds"):
        pools_table.add_column(col)
    for st in statuses:
        row = st.summary()
        pools_table.add_row(
            st.pool.name,
            ", ".join(row["job_kinds"]),
            ", ".join(row["queues"]),
            "?" if st.backlog is None else str(st.backlog),
            "?" if st.want is None else str(st.want),
            str(row["running"]),
            str(row["busy"]),
            str(row["booting"]),
            str(row["draining"]),
            f"{row['min_workers']}..{row['max_workers']}, {row['per_worker']} per worker"
            + (f", {row['flavor']}" if row["flavor"] else ""),
        )
    console.print(pools_table)
    for st in statuses:
        if st.error:
            console.print(f"[red]pool {st.pool.name}: {escape(st.error)}[/red]")
    if unserved:
        console.print(f"[yellow]no pool consumes {', '.join(unserved)}: those jobs wait in their queue[/yellow]")
    if orphans:
        console.print(f"[yellow]{escape(_orphans_hint(orphans))}[/yellow]")
    workers = [(st.pool.name, w) for st in statuses for w in st.workers]
    workers += [(f"{w.pool or '?'} (orphan)", w) for w in orphans]
    table = Table(title=f"workers ({len(workers)})")
    for col in ("pool", "server", "status", "age", "worker", "job (scene)", "heartbeat", "address / log"):
        table.add_column(col)
    for name, w in workers:
        table.add_row(
            name,
            w.id,
            w.server_status,
            _age(now - w.started_at_s) if w.started_at_s else "",
            w.state,
            str(w.current_scene or ""),
            f"{w.heartbeat_age_s:.0f} s ago" if w.heartbeat_age_s is not None else "",
            w.address or w.detail,
        )
    console.print(table)


@provision_app.command("drain")
def drain_cmd(
    servers: list[str] = typer.Argument(None, help="Worker ids / server names (see `provision status`)."),
    all_: bool = typer.Option(False, "--all", help="Drain every worker (of the --pool ones)."),
    pool: list[str] = typer.Option(None, "--pool", help=POOL_OPTION_HELP),
) -> None:
    """Ask workers to finish (or requeue) their current job and exit; `scale` deletes them once stopped."""
    if bool(servers) == all_:
        raise _fail(InvalidInputError("name the servers to drain, or pass --all"))
    try:
        fleets = service.pool_fleets(names=pool)
        if not all_:
            known = {w.id for _, _, workers in fleets for w in workers}
            unknown = sorted(set(servers) - known)
            if unknown:
                raise InvalidInputError(f"no such worker: {', '.join(unknown)}")
        drained = []
        for _, driver, workers in fleets:
            if all_:
                drained += driver.down()
            else:
                mine = [s for s in servers if s in {w.id for w in workers}]
                drained += driver.drain(mine) if mine else []
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.echo(f"draining {len(drained)} worker(s){': ' + ', '.join(drained) if drained else ''}")


@provision_app.command("down")
def down_cmd(
    wait_s: float = typer.Option(0.0, "--wait", help="Seconds to wait for the workers to stop (0 = don't wait)."),
    pool: list[str] = typer.Option(None, "--pool", help=POOL_OPTION_HELP),
    orphans: bool = typer.Option(
        False, "--orphans", help="Only the workers of pools no longer configured (renamed or removed)."
    ),
) -> None:
    """Drain every worker of every pool: each finishes (or requeues) its current job and exits; with
    --wait, remove them. With --orphans, only those of pools no longer configured."""
    try:
        if orphans and pool:
            raise InvalidInputError("--orphans drains the workers of no configured pool: it takes no --pool")
        drivers = [service.orphan_driver()] if orphans else [driver for _, driver, _ in service.pool_fleets(names=pool)]
        drained = [worker_id for driver in drivers for worker_id in driver.down()]
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.echo(f"draining {len(drained)} worker(s){': ' + ', '.join(drained) if drained else ''}")
    if wait_s > 0:
        deadline = time.monotonic() + wait_s
        left = [w for driver in drivers for w in wait_down(driver, max(0.0, deadline - time.monotonic()))]
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
    pool: str | None = typer.Option(None, "--pool", help="The pool whose workers' user-data (needed with several)."),
) -> None:
    """Print the worker's #cloud-config user-data to stdout (it contains secrets)."""
    from provisioner.drivers.local import local_worker_command
    from provisioner.userdata import example_userdata, pool_env, render_userdata, resolve_install, worker_env

    if example:
        try:
            sys.stdout.write(example_userdata(resolve_install(install or "wheel", "")))
        except CbmflowError as exc:
            raise _fail(exc) from exc
        return
    try:
        selected = _pools([pool] if pool else None)
        if len(selected) != 1:
            raise InvalidInputError(f"name the pool with --pool ({', '.join(p.name for p in selected)})")
        settings = selected[0].settings
        url = settings.wheel_url if wheel_url is None else wheel_url
        mode = resolve_install(settings.install if install is None else install, url)
        text = render_userdata(
            {**worker_env(), **pool_env(settings)},
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
    """The worker of whichever pool holds it, with that pool's settings (its SSH user, its driver)."""
    for pool, _, workers in service.pool_fleets():
        for w in workers:
            if server in (w.id, w.server_id):
                return pool.settings, w
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
        None,
        "--scenario",
        "-s",
        help="daily | backfill | trickle (repeatable; default: daily and backfill, or custom with --burst/--rate).",
    ),
    per_worker: list[int] = typer.Option(
        None, "--per-worker", help="Backlog per worker (repeatable; default: the pool's, else 5)."
    ),
    max_workers: int | None = typer.Option(None, "--max", help="Most workers (default: the pool's, else 20)."),
    min_workers: int | None = typer.Option(None, "--min", help="Fewest workers (default: the pool's, else 0)."),
    max_surge: int | None = typer.Option(None, "--surge", help="Most boots per step (default: the pool's, else 4)."),
    window_s: float | None = typer.Option(
        None, "--window", help="Scale-down stabilisation window (s) (default: the pool's, else 900)."
    ),
    cooldown_s: float | None = typer.Option(
        None, "--cooldown", help="Scale-down cooldown after a scale event (s) (default: the pool's, else 300)."
    ),
    pool: str | None = typer.Option(
        None, "--pool", help="Take the law's bounds and timings from this configured pool (CBMFLOW_PROVISION_POOLS)."
    ),
    boot_delay_s: float = typer.Option(180.0, "--boot-delay", help="Seconds from boot to a registered worker."),
    job_median_s: float = typer.Option(
        120.0, "--job-median", help="Median job duration (s), log-normal: the pool's per-job cost."
    ),
    job_sigma: float = typer.Option(0.5, "--job-sigma", help="Log-normal sigma of the job duration."),
    burst_jobs: int = typer.Option(0, "--burst", help="Custom load: this many jobs published at once."),
    rate_per_h: float = typer.Option(0.0, "--rate", help="Custom load: Poisson jobs per hour, in 5-minute polls."),
    hours: float = typer.Option(24.0, "--hours", help="Custom load: hours the --rate arrivals last."),
    quota: int | None = typer.Option(None, "--quota", help="Servers the cloud project admits (default: unlimited)."),
    seed: int = typer.Option(1, "--seed", help="Random seed (arrivals, durations, boot jitter)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Run the real control law of one pool against a simulated queue and VM fleet; report cost, waits,
    scale events. A pool is simulated alone: give it its own job time and load (a CARD pool: minutes
    per job, a few hundred inputs a day)."""
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from provisioner.simulate import SCENARIOS, custom, simulate

    try:
        base = Policy(
            per_worker=5, min_workers=0, max_workers=20, max_surge=4, scale_down_window_s=900.0, cooldown_s=300.0
        )
        if pool:
            [chosen] = _pools([pool])
            base = Policy.from_settings(chosen.settings)
        changes: dict[str, Any] = {
            "min_workers": min_workers,
            "max_workers": max_workers,
            "max_surge": max_surge,
            "scale_down_window_s": window_s,
            "cooldown_s": cooldown_s,
        }
        base = replace(base, **{k: v for k, v in changes.items() if v is not None})
    except (CbmflowError, ValueError) as exc:
        raise _fail(exc) from exc
    timings: dict[str, Any] = {
        "boot_delay_s": boot_delay_s,
        "job_median_s": job_median_s,
        "job_sigma": job_sigma,
        "quota": quota,
    }
    loads = []
    if burst_jobs > 0 or rate_per_h > 0:
        loads.append(custom(burst_jobs, rate_per_h, hours, **timings))
    names = scenario or ([] if loads else ["daily", "backfill"])
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise _fail(InvalidInputError(f"unknown scenario {', '.join(unknown)}; use {', '.join(SCENARIOS)}"))
    loads += [replace(SCENARIOS[name], **timings) for name in names]
    rows = []
    for sc in loads:
        for k in per_worker or [base.per_worker]:
            try:
                policy = replace(base, per_worker=k)
            except ValueError as exc:
                raise _fail(exc) from exc
            rows.append(simulate(sc, policy, seed=seed).row())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    title = (
        f"simulation{f' of pool {pool}' if pool else ''}: min {base.min_workers}, max {base.max_workers},"
        f" window {base.scale_down_window_s:.0f} s, cooldown {base.cooldown_s:.0f} s,"
        f" jobs median {job_median_s:.0f} s"
    )
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(provision_app, name="provision")
