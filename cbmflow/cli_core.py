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
    dead_lettered: bool = typer.Option(False, "--dead-lettered", help="Alias of --failed."),
    scene: list[int] = typer.Option([], "--scene", help="Only these scene ids."),
) -> None:
    """Re-publish jobs for failed scenes (after fixing the cause) through the outbox."""
    import json

    from catalog_watcher.service import flush_outbox
    from cbmflow import db
    from cbmflow.messages import ExtractParcels
    from cbmflow.settings import BusSettings, DbSettings

    if not (failed or dead_lettered or scene):
        raise typer.BadParameter("give --failed/--dead-lettered or --scene ID")
    dsn = DbSettings().resolved_dsn()
    with db.transaction(dsn) as cur:
        if scene:
            cur.execute("SELECT id, product_id, card, location FROM scenes WHERE id = ANY(%s)", (list(scene),))
        else:
            cur.execute("SELECT id, product_id, card, location FROM scenes WHERE status = 'failed'")
        rows = cur.fetchall()
        for sid, pid, card, loc in rows:
            msg = ExtractParcels(scene_id=sid, product_id=pid, card=card, location=loc)
            cur.execute("UPDATE scenes SET status = 'discovered', reason = NULL WHERE id = %s", (sid,))
            cur.execute(
                "INSERT INTO outbox (message_id, kind, body) VALUES (%s, %s, %s)",
                (msg.message_id, msg.kind, json.dumps(msg.model_dump(mode="json"))),
            )
    published = flush_outbox(dsn, BusSettings())
    typer.echo(f"re-queued {len(rows)} scene(s), published {published} job(s)")


def demo_data(
    out: Path = typer.Option(..., "--out", help="Output directory."),
    parcels: int = typer.Option(300, "--parcels", min=1),
    scenes: int = typer.Option(10, "--scenes", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a deterministic test world: AOI, parcels, S2 L2A SAFE products, STAC catalogue, truth."""
    import time

    from card.testworld import generate

    started = time.monotonic()
    summary = generate(out, parcels=parcels, scenes=scenes, seed=seed)
    typer.echo(
        f"test world in {out}: {summary.n_parcels} parcels ({summary.n_invalid} invalid), "
        f"{len(summary.products)} products, {time.monotonic() - started:.1f} s"
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
