"""``cbmflow provision``: scale workers by queue depth, show the fleet, drain it, render user-data.

``scale`` is one idempotent control step (read backlog, list workers, plan, apply) meant to be run
every 30-60 s by a timer or loop; it keeps no state of its own beyond what the driver records, so a
crashed or restarted provisioner simply carries on.
"""

from __future__ import annotations

import fcntl
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from cbmflow.errors import CbmflowError, ConfigError
from cbmflow.logging import get_logger
from cbmflow.settings import DbSettings, ProvisionSettings, state_dir
from provisioner.drivers import WorkerDriver
from provisioner.policy import Plan, WorkerView, plan

log = get_logger("provisioner")

provision_app = typer.Typer(help="Scale workers by queue depth (local processes; OpenStack planned).")


def _optional_dsn() -> str | None:
    try:
        return DbSettings().resolved_dsn()
    except ConfigError:
        return None


def _base_config(settings: ProvisionSettings) -> dict[str, Any] | None:
    """The operator's own cloud-config (``userdata_template``), merged under the worker's pieces."""
    if not settings.userdata_template:
        return None
    import yaml

    path = Path(settings.userdata_template)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"CBMFLOW_PROVISION_USERDATA_TEMPLATE {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"CBMFLOW_PROVISION_USERDATA_TEMPLATE {path}: not a cloud-config mapping")
    return doc


def make_driver(settings: ProvisionSettings) -> WorkerDriver:
    if settings.driver == "local":
        from provisioner.drivers.local import LocalDriver, local_worker_command
        from provisioner.userdata import render_userdata, worker_env

        def userdata() -> str:
            return render_userdata(worker_env(), worker_command=local_worker_command())

        return LocalDriver(state_dir() / "workers", userdata=userdata, dsn=_optional_dsn())
    raise ConfigError(f"provision driver {settings.driver!r} is not available (only 'local' is implemented)")


@contextmanager
def _scale_lock() -> Iterator[None]:
    """One control step at a time: two overlapping steps would both start the same shortfall."""
    path = state_dir() / "provision.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def apply_plan(driver: WorkerDriver, step: Plan) -> tuple[list[str], list[str]]:
    """(started ids, drained ids)."""
    started = driver.start(step.start) if step.start else []
    drained = driver.drain(list(step.drain)) if step.drain else []
    return started, drained


def current_backlog() -> int:
    """Ready + unacknowledged jobs, without the management API's sampling lag for ready ones.

    The management API refreshes every ~5 s, so right after the watcher published a batch it can
    still read 0 and a single control step would start nothing. The AMQP passive declare sees ready
    messages at once; unacknowledged ones (only visible to the management API) are by definition
    already with a worker, so their lag cannot hide work from an empty fleet. Either source alone is
    enough to scale on, so one being unavailable is logged, not fatal.
    """
    import pika.exceptions

    from cbmflow import bus as busmod
    from cbmflow.settings import BusSettings

    settings = BusSettings()
    sampled: int | None = None
    unacked = 0
    try:
        depth = busmod.queue_depth(settings)
        sampled, unacked = depth.backlog, depth.unacked
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - HTTP errors, and odd replies for a queue not yet sampled
        log.warning("provision.management_depth_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
    ready: int | None = None
    try:
        conn = busmod.connect(settings)
        try:
            ready, _ = busmod.passive_depth(conn.channel(), settings)
        finally:
            if conn.is_open:
                conn.close()
    except pika.exceptions.AMQPError as exc:  # queue not declared yet, or broker briefly away
        log.info("provision.passive_depth_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
    if sampled is None and ready is None:
        raise ConfigError("cannot read the job backlog: neither the management API nor AMQP answered")
    return max(sampled or 0, (ready or 0) + unacked)


def scale_once(
    settings: ProvisionSettings | None = None,
    *,
    dry_run: bool = False,
    driver: WorkerDriver | None = None,
    backlog: int | None = None,
) -> Plan:
    """One control step; ``backlog`` overrides the broker reading (tests, what-if runs)."""
    settings = settings or ProvisionSettings()
    if backlog is None:
        backlog = current_backlog()
    driver = driver or make_driver(settings)
    with _scale_lock():
        workers = driver.list_workers()
        step = plan(
            backlog,
            workers,
            per_worker=settings.per_worker,
            min_workers=settings.min_workers,
            max_workers=settings.max_workers,
        )
        if dry_run:
            log.info("provision.plan", dry_run=True, plan=str(step))
            return step
        started, drained = apply_plan(driver, step)
    log.info("provision.scaled", backlog=backlog, want=step.want, started=started, drained=drained)
    return step


def _fleet_table(workers: list[WorkerView]) -> Any:
    from rich.table import Table

    table = Table(title=f"workers ({len(workers)})")
    for col in ("id", "state", "pid", "scene", "heartbeat", "up", "log"):
        table.add_column(col)
    now_s = time.time()
    for w in workers:
        table.add_row(
            w.id,
            w.state,
            str(w.pid or ""),
            str(w.current_scene or ""),
            f"{w.heartbeat_age_s:.0f} s ago" if w.heartbeat_age_s is not None else "",
            f"{now_s - w.started_at_s:.0f} s" if w.started_at_s else "",
            w.detail,
        )
    return table


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


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
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; start and drain nothing."),
) -> None:
    """One control step: want = clamp(ceil(backlog / per-worker), min, max); start or drain idle workers."""
    from rich.console import Console
    from rich.table import Table

    overrides = {
        k: v
        for k, v in {"min_workers": min_workers, "max_workers": max_workers, "per_worker": per_worker}.items()
        if v is not None
    }
    settings = ProvisionSettings().model_copy(update=overrides)
    try:
        driver = make_driver(settings)
        before = {w.id for w in driver.list_workers()}
        step = scale_once(settings, dry_run=dry_run, driver=driver)
    except Exception as exc:  # noqa: BLE001 - config, broker and management API errors come in many types
        raise _fail(exc) from exc
    console = Console()
    table = Table(title="scaling plan" + (" (dry run)" if dry_run else ""))
    for col in ("backlog", "fleet", "want", "start", "drain", "note"):
        table.add_column(col)
    table.add_row(
        str(step.backlog), str(step.fleet), str(step.want), str(step.start), ", ".join(step.drain), step.reason
    )
    console.print(table)
    if dry_run:
        return
    after = {w.id for w in driver.list_workers()}
    new = sorted(after - before)
    console.print(
        f"started {len(new)}{': ' + ', '.join(new) if new else ''}; "
        f"draining {len(step.drain)}{': ' + ', '.join(step.drain) if step.drain else ''}; "
        f"fleet now {len(after)}"
    )


@provision_app.command("status")
def status_cmd() -> None:
    """The fleet: each worker's registry state, current scene, heartbeat age and log."""
    from rich.console import Console

    try:
        workers = make_driver(ProvisionSettings()).list_workers()
    except CbmflowError as exc:
        raise _fail(exc) from exc
    Console().print(_fleet_table(workers))


@provision_app.command("down")
def down_cmd(
    wait_s: float = typer.Option(0.0, "--wait", help="Seconds to wait for the workers to exit (0 = don't wait)."),
) -> None:
    """Drain every worker: each finishes (or requeues) its current job and exits."""
    try:
        driver = make_driver(ProvisionSettings())
        drained = driver.down()
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.echo(f"draining {len(drained)} worker(s){': ' + ', '.join(drained) if drained else ''}")
    if wait_s > 0 and drained:
        from provisioner.drivers.local import LocalDriver

        if isinstance(driver, LocalDriver):
            left = driver.wait_gone(drained, wait_s)
            if left:
                typer.echo(f"still running after {wait_s:.0f} s: {', '.join(left)}")
                raise typer.Exit(1)
            typer.echo("all stopped")


@provision_app.command("render-userdata")
def render_userdata_cmd(
    install: str | None = typer.Option(
        None, "--install", help="preinstalled | wheel | index (default: wheel when CBMFLOW_PROVISION_WHEEL_URL is set)."
    ),
    wheel_url: str | None = typer.Option(None, "--wheel-url", help="Wheel URL (default: CBMFLOW_PROVISION_WHEEL_URL)."),
    index_url: str = typer.Option("", "--index-url", help="Package index for install=index (default: PyPI)."),
    local: bool = typer.Option(False, "--local", help="The variant the local driver starts (this venv's worker)."),
    example: bool = typer.Option(False, "--example", help="Placeholder values: cloud-init/worker.example.yaml."),
) -> None:
    """Print the worker's #cloud-config user-data to stdout (it contains secrets)."""
    from provisioner.drivers.local import local_worker_command
    from provisioner.userdata import INSTALL_MODES, example_userdata, render_userdata, worker_env

    if example:
        sys.stdout.write(example_userdata())
        return
    settings = ProvisionSettings()
    url = settings.wheel_url if wheel_url is None else wheel_url
    mode = install or ("wheel" if url else "preinstalled")
    if mode not in INSTALL_MODES:
        raise _fail(ConfigError(f"--install must be one of {', '.join(INSTALL_MODES)}"))
    try:
        text = render_userdata(
            worker_env(),
            install=mode,
            wheel_url=url,
            index_url=index_url,
            worker_command=local_worker_command() if local else None,
            base_config=_base_config(settings),
        )
    except CbmflowError as exc:
        raise _fail(exc) from exc
    typer.secho(
        "warning: this user-data contains the database and broker credentials; keep it out of logs and tickets",
        fg=typer.colors.YELLOW,
        err=True,
    )
    sys.stdout.write(text)


def register(app: typer.Typer) -> None:
    app.add_typer(provision_app, name="provision")
