"""Provisioning as functions: the control step, the driver for the configured pool, user-data.

The CLI (``cbmflow provision``), the demo and the tests all call these; none of them lives in a
command module, so running a step never needs typer.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cbmflow.errors import ConfigError
from cbmflow.logging import get_logger
from cbmflow.settings import DbSettings, ProvisionSettings, state_dir
from provisioner.controller import Applied, Controller, FileHistory
from provisioner.drivers import WorkerDriver
from provisioner.policy import Plan, Policy

log = get_logger("provisioner")

DRIVERS = ("local", "openstack")


def _optional_dsn() -> str | None:
    try:
        return DbSettings().resolved_dsn()
    except ConfigError:
        return None


def base_config(settings: ProvisionSettings) -> dict[str, Any] | None:
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


def server_userdata(settings: ProvisionSettings, name: str) -> str:
    """The user-data of the VM called ``name``: the worker environment plus its own worker id.

    The id is the server name so that the registry row and the server join without guessing
    (a host name can be rewritten by the image; a pid changes on every restart).
    """
    from provisioner.userdata import render_userdata, resolve_install, worker_env

    env = {**worker_env(), "CBMFLOW_WORKER_ID": name}
    return render_userdata(
        env,
        install=resolve_install(settings.install, settings.wheel_url),
        wheel_url=settings.wheel_url,
        index_url=settings.index_url,
        base_config=base_config(settings),
    )


def make_driver(settings: ProvisionSettings) -> WorkerDriver:
    if settings.driver == "local":
        from provisioner.drivers.local import LocalDriver, local_worker_command
        from provisioner.userdata import render_userdata, worker_env

        def userdata() -> str:
            return render_userdata(worker_env(remote=False), worker_command=local_worker_command())

        return LocalDriver(state_dir() / "workers", userdata=userdata, dsn=_optional_dsn())
    if settings.driver == "openstack":
        from provisioner.drivers.openstack import OpenStackDriver

        return OpenStackDriver(settings, userdata=lambda name: server_userdata(settings, name), dsn=_optional_dsn())
    raise ConfigError(f"CBMFLOW_PROVISION_DRIVER {settings.driver!r}: use one of {', '.join(DRIVERS)}")


def _pool_key(settings: ProvisionSettings) -> str:
    return f"{settings.driver}-{settings.pool}"


@contextmanager
def _scale_lock(settings: ProvisionSettings) -> Iterator[None]:
    """One control step per pool at a time: two overlapping steps would both boot the same shortfall."""
    path = state_dir() / f"provision-{_pool_key(settings)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def run_step(
    settings: ProvisionSettings,
    *,
    dry_run: bool = False,
    driver: WorkerDriver | None = None,
    backlog: int | None = None,
) -> tuple[Plan, Applied]:
    """One locked control step with the pool's persisted history; what ``scale`` and ``watch`` run."""
    if backlog is None:
        backlog = current_backlog()
    driver = driver or make_driver(settings)
    history = FileHistory(state_dir() / f"provision-{_pool_key(settings)}.json")
    controller = Controller(driver, Policy.from_settings(settings), history)
    with _scale_lock(settings):
        step, applied = controller.step(backlog, dry_run=dry_run)
    log.info(
        "provision.plan" if dry_run else "provision.scaled",
        dry_run=dry_run,
        backlog=backlog,
        fleet=step.fleet,
        want=step.want,
        target=step.target,
        started=applied.started,
        drained=applied.drained,
        deleted=applied.deleted,
        reason=step.reason,
    )
    return step, applied


def scale_once(
    settings: ProvisionSettings | None = None,
    *,
    dry_run: bool = False,
    driver: WorkerDriver | None = None,
    backlog: int | None = None,
) -> Plan:
    """One control step; ``backlog`` overrides the broker reading (tests, what-if runs)."""
    return run_step(settings or ProvisionSettings(), dry_run=dry_run, driver=driver, backlog=backlog)[0]


def wait_down(driver: WorkerDriver, timeout_s: float, poll_s: float = 0.5) -> list[str]:
    """Wait for drained workers to stop, deleting each stopped one; returns those left at the deadline.

    Only stopped workers are deleted here, so a worker finishing a long job is waited for, not killed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        workers = driver.list_workers()
        stopped = [w.id for w in workers if w.state == "stopped"]
        if stopped:
            driver.delete(stopped)
        left = [w.id for w in workers if w.id not in stopped]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)
