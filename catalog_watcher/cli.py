"""``cbmflow watch``: one cycle or a polling loop."""

from __future__ import annotations

import threading

import typer


def register(app: typer.Typer) -> None:
    @app.command("watch")
    def watch(
        catalog: str = typer.Option("", "--catalog", help="STAC API URL or static catalog.json."),
        once: bool = typer.Option(False, "--once", help="Run one cycle and exit."),
        interval_s: float = typer.Option(0.0, "--interval", help="Seconds between cycles (default from settings)."),
        lookback_days: int = typer.Option(-1, "--lookback-days", help="Acquisition window; 0 = unbounded."),
    ) -> None:
        """Poll the catalogue, record new scenes and publish one ExtractParcels job per new scene."""
        from rich.console import Console
        from rich.markup import escape

        from catalog_watcher.daemon import install_stop_handlers, watch_forever
        from catalog_watcher.service import ScanFailed, watch_once
        from cbmflow.settings import WatchSettings

        overrides: dict[str, object] = {}
        if catalog:
            overrides["catalog_url"] = catalog
        if lookback_days >= 0:
            overrides["lookback_days"] = lookback_days
        settings = WatchSettings(**overrides)  # type: ignore[arg-type]
        if not settings.all_sources():
            raise typer.BadParameter(
                "no catalogue: pass --catalog or set CBMFLOW_WATCH_CATALOG_URL or CBMFLOW_WATCH_SOURCES"
            )
        if once:
            failed = False
            try:
                report = watch_once(settings=settings)
            except ScanFailed as exc:
                report, failed = exc.report, True
            console = Console()
            console.print(
                f"[bold]watch[/bold]: {report.seen} items over the AOIs, {report.new} new, "
                f"{report.changed} changed, {report.superseded} superseded, {report.duplicates} duplicates, "
                f"{len(report.rejected)} rejected, {report.offline} offline, {report.deleted} deleted, "
                f"{report.published} jobs published, {report.pending} pending"
            )
            if report.card_inputs:
                # Sentinel-1 GRD/SLC are inputs of CARD generation, not rejections: a GRD gets a
                # GenerateCard(bs) job through the outbox (counted in "jobs published"); an SLC waits.
                counts = ", ".join(f"{n} {what}" for what, n in sorted(report.card_inputs.items()))
                console.print(f"[bold]CARD inputs[/bold] (S1 GRD → GenerateCard job; SLC recorded): {counts}")
            for line in report.rejected[:20]:
                console.print(f"[yellow]rejected[/yellow] {escape(line)}")
            if len(report.rejected) > 20:
                console.print(f"… and {len(report.rejected) - 20} more (cbmflow status)")
            for line in report.errors:
                console.print(f"[red]scan failed[/red] {escape(line)}")
            if failed:
                raise typer.Exit(1)
            return
        stop = threading.Event()
        install_stop_handlers(stop)
        watch_forever(interval_s or settings.interval_s, settings=settings, stop=stop)
