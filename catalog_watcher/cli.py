"""``cbmflow watch``: one cycle or a polling loop."""

from __future__ import annotations

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

        from catalog_watcher.service import watch_forever, watch_once
        from cbmflow.settings import WatchSettings

        overrides: dict[str, object] = {}
        if catalog:
            overrides["catalog_url"] = catalog
        if lookback_days >= 0:
            overrides["lookback_days"] = lookback_days
        settings = WatchSettings(**overrides)  # type: ignore[arg-type]
        if not settings.catalog_url:
            raise typer.BadParameter("no catalogue: pass --catalog or set CBMFLOW_WATCH_CATALOG_URL")
        if once:
            report = watch_once(settings=settings)
            Console().print(
                f"[bold]watch[/bold]: {report.seen} scenes over the AOIs, {report.new} new, "
                f"{report.changed} changed, {report.published} jobs published, {report.pending} pending"
            )
            return
        watch_forever(interval_s or settings.interval_s, settings=settings)
