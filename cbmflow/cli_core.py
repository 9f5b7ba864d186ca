"""Kernel sub-commands: ``db``, ``demo-data``, ``parcels``, ``aoi``, ``status``, ``jobs``, ``demo``."""

from __future__ import annotations

from pathlib import Path

import typer

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and re-publish jobs.", no_args_is_help=True)


@db_app.command("migrate")
def migrate() -> None:
    """Apply pending sql/NNN_*.sql migrations (tracked; safe to re-run)."""
    from cbmflow import db

    applied = db.migrate()
    typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@jobs_app.command("retry")
def jobs_retry(
    failed: bool = typer.Option(False, "--failed", help="Re-publish every scene in status failed."),
    dead_lettered: bool = typer.Option(
        False, "--dead-lettered", help="Re-publish every scene with a message in the dead-letter queue."
    ),
    scene: list[int] = typer.Option([], "--scene", help="Only these scene ids (alone: exactly these, even finished)."),
) -> None:
    """Re-publish jobs after fixing the cause, through the outbox; their dead letters are removed
    once the new job is confirmed. Malformed messages and unknown scenes stay in the dead-letter queue."""
    from cbmflow.jobs import retry
    from cbmflow.settings import BusSettings, DbSettings

    if not (failed or dead_lettered or scene):
        raise typer.BadParameter("give --failed, --dead-lettered and/or --scene ID")
    import pika.exceptions

    try:
        report = retry(
            DbSettings().resolved_dsn(), BusSettings(), failed=failed, dead_lettered=dead_lettered, scenes=scene
        )
    except (pika.exceptions.AMQPError, OSError) as exc:
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
    for sid, why in sorted(report.skipped.items()):
        typer.echo(f"skipped scene {sid}: {why}")
    if report.pending:
        typer.echo(
            f"{len(report.pending)} job(s) not confirmed by the broker, left in the outbox for the next flush: "
            + ", ".join(map(str, report.pending)),
            err=True,
        )
        raise typer.Exit(1)


def demo_data(
    out: Path = typer.Option(..., "--out", help="Output directory."),
    parcels: int = typer.Option(300, "--parcels", min=1),
    scenes: int = typer.Option(10, "--scenes", min=1),
    seed: int = typer.Option(0, "--seed"),
    s1_scenes: int = typer.Option(0, "--s1-scenes", min=0, help="Sentinel-1 CARD backscatter (bs) COGs."),
    c6_scenes: int = typer.Option(0, "--c6-scenes", min=0, help="Sentinel-1 CARD 6-day coherence (c6) COGs."),
) -> None:
    """Write a deterministic test world: AOI, parcels, S2 L2A SAFE products (and, on request,
    S1 CARD COGs), STAC catalogue, truth."""
    import time

    from card.testworld import generate

    started = time.monotonic()
    summary = generate(out, parcels=parcels, scenes=scenes, seed=seed, s1_scenes=s1_scenes, c6_scenes=c6_scenes)
    typer.echo(
        f"test world in {out}: {summary.n_parcels} parcels ({summary.n_invalid} invalid), "
        f"{len(summary.products)} S2 products, {len(summary.s1_products)} S1 CARD products,"
        f" {time.monotonic() - started:.1f} s"
    )


def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Queue depths, scenes by status and workers, on one screen."""
    from cbmflow.status import print_status

    print_status(as_json=as_json)


def demo(
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the API at the end."),
    parcels: int = typer.Option(300, "--parcels"),
    scenes: int = typer.Option(10, "--scenes"),
    workers: int = typer.Option(2, "--workers", help="Maximum local workers."),
    port: int = typer.Option(8080, "--port", help="API port when serving."),
) -> None:
    """Run the whole chain on generated data and verify it against the generator's truth."""
    from cbmflow.demo import run_demo

    raise typer.Exit(run_demo(serve=serve, parcels=parcels, scenes=scenes, max_workers=workers, port=port))


def register(app: typer.Typer) -> None:
    from cbmflow.parcels import aoi_app, parcels_app

    app.add_typer(db_app, name="db")
    app.add_typer(parcels_app, name="parcels", help="Import and list parcels.")
    app.add_typer(aoi_app, name="aoi", help="Areas of interest.")
    app.add_typer(jobs_app, name="jobs")
    app.command("demo-data")(demo_data)
    app.command("status")(status)
    app.command("demo")(demo)
    app.command("settings")(settings_cmd)


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
