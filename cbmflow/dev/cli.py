"""Development commands: ``stack``, ``demo`` and ``demo-data`` (the local servers and generated worlds)."""

from __future__ import annotations

from pathlib import Path

import typer


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


def demo(
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the API at the end."),
    parcels: int = typer.Option(300, "--parcels"),
    scenes: int = typer.Option(10, "--scenes"),
    workers: int = typer.Option(2, "--workers", help="Maximum local workers."),
    port: int = typer.Option(8080, "--port", help="API port when serving."),
) -> None:
    """Run the whole chain on generated data and verify it against the generator's truth."""
    from cbmflow.dev.demo import run_demo

    raise typer.Exit(run_demo(serve=serve, parcels=parcels, scenes=scenes, max_workers=workers, port=port))


def register(app: typer.Typer) -> None:
    from cbmflow.dev.stack import app as stack_app

    app.add_typer(stack_app, name="stack", help="Start, stop and inspect the local PostgreSQL + RabbitMQ stack.")
    app.command("demo-data")(demo_data)
    app.command("demo")(demo)
