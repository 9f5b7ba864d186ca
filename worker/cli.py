"""``cbmflow worker``: consume extraction jobs until stopped or drained."""

from __future__ import annotations

import os

import typer


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        max_jobs: int = typer.Option(0, "--max-jobs", help="Exit after this many jobs (0 = never)."),
        idle_exit_s: float = typer.Option(-1.0, "--idle-exit", help="Exit after this many idle seconds (0 = never)."),
    ) -> None:
        """Consume ExtractParcels jobs (prefetch 1, manual ack) and write parcel statistics."""
        from cbmflow.settings import WorkerSettings

        settings = WorkerSettings()
        if settings.threads:
            # Before numba and GDAL load: both size their thread pools once, at import.
            os.environ["NUMBA_NUM_THREADS"] = str(settings.threads)
            os.environ["GDAL_NUM_THREADS"] = str(settings.threads)
        from worker.consumer import Worker

        if idle_exit_s >= 0:
            settings = settings.model_copy(update={"idle_exit_s": idle_exit_s})
        raise typer.Exit(Worker(settings=settings, max_jobs=max_jobs).run())
