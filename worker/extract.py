"""``cbmflow extract``: the extraction engine without a database (filled in by issue #3)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Placeholder: the DB-less extract command is registered here."""
    _ = app
