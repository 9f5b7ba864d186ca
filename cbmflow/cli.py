"""The one ``cbmflow`` command. Each component contributes its own sub-commands.

Sub-command modules import their heavy dependencies (numba, rasterio) inside the commands, so
``cbmflow --help`` and ``cbmflow stack status`` stay fast, and so every command is listed on an
install that has only some of the extras (a worker VM has ``cbmflow[worker]``). A command whose
extra is missing says which one to install instead of printing a traceback.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import typer

from cbmflow import __version__

app = typer.Typer(
    name="cbmflow",
    help="Copernicus scenes to per-parcel time series for CAP Checks by Monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module with ``register(app)``, the extra its commands need ("" = the core install), the top-level
# names it registers). The names are only used when the module itself cannot be imported.
COMPONENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("cbmflow.dev.cli", "all", ("stack", "demo-data", "demo")),
    ("cbmflow.ops.cli", "", ("db", "jobs", "status", "settings")),
    ("cbmflow.parcels.cli", "parcels", ("parcels", "aoi")),
    ("catalog_watcher.cli", "watcher", ("watch",)),
    ("worker.cli", "worker", ("worker",)),
    ("worker.extract", "extract", ("extract",)),
    ("worker.cardgen", "worker", ("card",)),
    ("provisioner.cli", "provisioner", ("provision",)),
    ("api.cli", "api", ("api", "users")),
)
_OURS = frozenset({"cbmflow", "catalog_watcher", "provisioner", "worker", "card", "api"})


def _missing_library(exc: ModuleNotFoundError) -> str | None:
    """The third-party distribution's top-level module that is missing; None for one of ours."""
    top = (exc.name or "").partition(".")[0]
    return top if top and top not in _OURS else None


def _needs_extra(library: str, extra: str) -> typer.Exit:
    typer.secho(
        f"error: this command needs {library}, which is not installed: pip install 'cbmflow[{extra}]'",
        fg=typer.colors.RED,
        err=True,
    )
    return typer.Exit(1)


def _guarded(callback: Callable[..., Any], extra: str) -> Callable[..., Any]:
    """``callback`` with a missing extra library reported as the extra to install.

    ``functools.wraps`` keeps the signature and annotations typer builds the options from.
    """

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ModuleNotFoundError as exc:
            library = _missing_library(exc)
            if library is None:
                raise
            raise _needs_extra(library, extra) from None

    return run


def _guard_new(target: typer.Typer, extra: str, commands_before: int, groups_before: int) -> None:
    for info in target.registered_commands[commands_before:]:
        if info.callback is not None:
            info.callback = _guarded(info.callback, extra)
    for group in target.registered_groups[groups_before:]:
        if group.typer_instance is not None:
            _guard_new(group.typer_instance, extra, 0, 0)


def _unavailable(names: tuple[str, ...], library: str, extra: str) -> None:
    """Stand-ins for commands whose module needs a missing library even to be registered."""

    def unavailable() -> None:
        raise _needs_extra(library, extra)

    for name in names:
        app.command(
            name,
            help=f"Needs cbmflow[{extra}] ({library} is not installed).",
            add_help_option=False,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )(unavailable)


def _register() -> None:
    """The composition root: every command group lives with its component and is only assembled here."""
    for module_name, extra, names in COMPONENTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            library = _missing_library(exc)
            if library is None or not extra:
                raise
            _unavailable(names, library, extra)
            continue
        register: Callable[[typer.Typer], None] = module.register
        commands_before, groups_before = len(app.registered_commands), len(app.registered_groups)
        register(app)
        if extra:
            _guard_new(app, extra, commands_before, groups_before)


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
