"""The one ``cbmflow`` command. Each component contributes its own sub-commands.

Sub-command modules import their heavy dependencies (numba, rasterio) inside the commands, so
``cbmflow --help`` and ``cbmflow stack status`` stay fast.
"""

from __future__ import annotations

import typer

from cbmflow import __version__

app = typer.Typer(
    name="cbmflow",
    help="Copernicus scenes to per-parcel time series for CAP Checks by Monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    """The composition root: every command group lives with its component and is only assembled here."""
    from api.cli import register as register_api
    from catalog_watcher.cli import register as register_watch
    from cbmflow.dev.cli import register as register_dev
    from cbmflow.ops.cli import register as register_ops
    from cbmflow.parcels.cli import register as register_parcels
    from provisioner.cli import register as register_provision
    from worker.cli import register as register_worker
    from worker.extract import register as register_extract

    register_dev(app)
    register_ops(app)
    register_parcels(app)
    register_watch(app)
    register_worker(app)
    register_extract(app)
    register_provision(app)
    register_api(app)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    _register()
    app()
