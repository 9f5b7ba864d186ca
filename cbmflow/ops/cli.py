"""Operator commands: ``db migrate``, ``db backup``/``db restore``, ``db cluster``, ``settings``,
``status`` and ``jobs retry``."""

from __future__ import annotations

from pathlib import Path

import typer

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and re-publish jobs.", no_args_is_help=True)
bus_app = typer.Typer(help="Broker users.", no_args_is_help=True)


@db_app.command("migrate")
def migrate() -> None:
    """Apply pending sql/NNN_*.sql migrations (tracked; safe to re-run)."""
    from cbmflow import db

    applied = db.migrate()
    typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@db_app.command("backup")
def db_backup(
    directory: Path = typer.Argument(..., help="New (or empty) directory for the dump and its manifest."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Tables dumped in parallel (pg_dump --jobs)."),
) -> None:
    """Back up the whole database (pg_dump directory format + manifest.json with checksums).
    Not included: cluster roles and passwords, queued messages, the object store's products."""
    from cbmflow.errors import CbmflowError
    from cbmflow.ops.backup import backup
    from cbmflow.settings import DbSettings

    try:
        m = backup(DbSettings().resolved_dsn(), directory, jobs=jobs)
    except CbmflowError as exc:
        typer.echo(f"backup failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"backed up {m['database']} (PostgreSQL {m['server_version']}, {len(m['migrations'])} migrations,"
        f" {m['counts']}) into {directory}: {m['dump_bytes']} bytes in {len(m['files'])} files"
    )


@db_app.command("restore")
def db_restore(
    directory: Path = typer.Argument(..., help="A directory written by `cbmflow db backup`."),
    force: bool = typer.Option(False, "--force", help="Drop the target database's contents first."),
    keep_grants: bool = typer.Option(
        False, "--keep-grants", help="Restore GRANTs too (their roles must exist on this cluster)."
    ),
) -> None:
    """Restore a backup into an empty database (checksums verified first; one transaction).
    Afterwards `cbmflow db migrate` has nothing to apply unless the code is newer than the backup."""
    from cbmflow.errors import CbmflowError
    from cbmflow.ops.backup import restore
    from cbmflow.settings import DbSettings

    try:
        r = restore(DbSettings().resolved_dsn(), directory, force=force, keep_grants=keep_grants)
    except CbmflowError as exc:
        typer.echo(f"restore refused or failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"restored {directory} into {r.database}{' (replaced its contents)' if r.forced else ''}:"
        f" {len(r.migrations)} migrations, {r.counts}"
    )


@db_app.command("cluster")
def db_cluster(
    dataset: str = typer.Option(..., "--dataset", help="AOI name of the dataset."),
    year: int = typer.Option(..., "--year", help="Season of the dataset."),
    lock_timeout_s: float = typer.Option(
        30.0, "--lock-timeout", help="Seconds to wait for the exclusive lock before giving up."
    ),
) -> None:
    """Rewrite a dataset's signatures in parcel order (CLUSTER), so a cold series reads a few pages
    instead of one per scene. Holds an exclusive lock while it copies: workers and the API wait, so
    run it in a maintenance window (e.g. after a season closes)."""
    import psycopg2

    from cbmflow.errors import CbmflowError
    from cbmflow.ops.cluster import cluster_dataset
    from cbmflow.settings import DbSettings

    try:
        r = cluster_dataset(DbSettings().resolved_dsn(), dataset, year, lock_timeout_s)
    except CbmflowError as exc:
        typer.echo(f"cluster failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    except psycopg2.errors.LockNotAvailable as exc:
        typer.echo(f"cluster failed: the table stayed locked for {lock_timeout_s:g} s; nothing changed", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"clustered {r.table}: {r.rows:,} rows, {r.bytes_before / 1e6:,.1f} -> {r.bytes_after / 1e6:,.1f} MB"
        f" in {r.seconds:.1f} s"
    )


@db_app.command("role-dsn")
def role_dsn(
    role: str = typer.Argument(..., help="worker, api or watcher."),
) -> None:
    """Create or rotate the LOGIN role of a component and print its DSN (the only copy of the password).

    Run as the database owner (CBMFLOW_DB_DSN). Rotating invalidates the DSN printed before for new
    connections; hand the new one to CBMFLOW_PROVISION_WORKER_DSN, CBMFLOW_API_DSN or the watcher's
    CBMFLOW_DB_DSN."""
    from cbmflow import db
    from cbmflow.errors import CbmflowError
    from cbmflow.settings import DbSettings

    try:
        typer.echo(db.role_dsn(DbSettings().resolved_dsn(), role))
    except CbmflowError as exc:
        typer.echo(f"db role-dsn: {exc}", err=True)
        raise typer.Exit(1) from exc


@bus_app.command("role-url")
def bus_role_url(role: str = typer.Argument(..., help="worker or watcher.")) -> None:
    """Create or rotate the broker user of a component and print its AMQP URL (the only copy of the
    password). Needs the management API (CBMFLOW_BUS_MANAGEMENT_URL); hand the worker's to
    CBMFLOW_PROVISION_WORKER_AMQP_URL and the watcher's to its CBMFLOW_BUS_AMQP_URL."""
    import requests

    from cbmflow import bus as busmod
    from cbmflow.errors import CbmflowError
    from cbmflow.settings import BusSettings

    try:
        typer.echo(busmod.role_url(BusSettings(), role))
    except CbmflowError as exc:
        typer.echo(f"bus role-url: {exc}", err=True)
        raise typer.Exit(1) from exc
    except requests.RequestException as exc:
        typer.echo(f"bus role-url: the management API refused or is unreachable: {exc}", err=True)
        raise typer.Exit(1) from exc


@jobs_app.command("retry")
def jobs_retry(
    failed: bool = typer.Option(False, "--failed", help="Re-publish every scene and CARD input in status failed."),
    dead_lettered: bool = typer.Option(
        False, "--dead-lettered", help="Re-publish every scene and CARD input with a message in the dead-letter queue."
    ),
    scene: list[int] = typer.Option([], "--scene", help="Only these scene ids (alone: exactly these, even finished)."),
    card_input: list[int] = typer.Option(
        [], "--card-input", help="Only these CARD input ids (alone: exactly these, even done: regenerated)."
    ),
) -> None:
    """Re-publish jobs (extraction and CARD generation) after fixing the cause, through the outbox;
    their dead letters are removed once the new job is confirmed. Malformed messages and unknown
    scenes stay in the dead-letter queue."""
    from cbmflow.ops.jobs import retry
    from cbmflow.settings import BusSettings, DbSettings

    if not (failed or dead_lettered or scene or card_input):
        raise typer.BadParameter("give --failed, --dead-lettered, --scene ID and/or --card-input ID")
    from cbmflow import bus as busmod

    try:
        report = retry(
            DbSettings().resolved_dsn(),
            BusSettings(),
            failed=failed,
            dead_lettered=dead_lettered,
            scenes=scene,
            card_inputs=card_input,
        )
    except busmod.BROKER_ERRORS as exc:
        # Safe to repeat: a dead letter goes only after its new job was confirmed, and a job sent
        # twice is harmless (workers claim scenes in the database).
        typer.echo(f"broker connection failed: {exc or type(exc).__name__}; run the command again", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"re-published {len(report.republished)} scene(s)"
        + (f": {', '.join(map(str, report.republished))}" if report.republished else "")
        + f"; dead letters removed {report.letters_removed}, kept {report.letters_kept}"
        + (f" ({report.letters_malformed} malformed)" if report.letters_malformed else "")
    )
    if report.cards_republished or report.cards_skipped or report.cards_pending:
        typer.echo(
            f"re-published {len(report.cards_republished)} CARD job(s)"
            + (f": card inputs {', '.join(map(str, report.cards_republished))}" if report.cards_republished else "")
        )
    for sid, why in sorted(report.skipped.items()):
        typer.echo(f"skipped scene {sid}: {why}")
    for input_id, why in sorted(report.cards_skipped.items()):
        typer.echo(f"skipped card input {input_id}: {why}")
    unconfirmed = [f"scene {i}" for i in report.pending] + [f"card input {i}" for i in report.cards_pending]
    if unconfirmed:
        typer.echo(
            f"{len(unconfirmed)} job(s) not confirmed by the broker, left in the outbox for the next flush: "
            + ", ".join(unconfirmed),
            err=True,
        )
        raise typer.Exit(1)


def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Queue depths, scenes by status and workers, on one screen."""
    from cbmflow.ops.status import print_status

    print_status(as_json=as_json)


def settings_cmd(markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table.")) -> None:
    """Every setting with its environment variable, default and meaning."""
    from cbmflow.settings import settings_table

    rows = settings_table()
    if markdown:
        typer.echo("| variable | default | meaning |\n|---|---|---|")
        for env, default, desc in rows:
            typer.echo(f"| `{env}` | `{default}` | {desc} |")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("variable", "default", "meaning"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(bus_app, name="bus")
    app.command("status")(status)
    app.command("settings")(settings_cmd)
