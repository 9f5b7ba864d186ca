"""Every command's ``--help`` renders.

Typer renders help through rich markup, so a help text such as ``s3://bucket[/prefix]`` is read as a
closing tag and ``--help`` dies with a traceback: the first thing an operator types. The tree is
walked from the assembled application, so a new command is covered without being listed here.
"""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cbmflow import cli


def _paths() -> list[tuple[str, ...]]:
    cli._register()
    root = typer.main.get_command(cli.app)
    found: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found.append(path)
        # typer vendors its own click: a group is whatever holds sub-commands
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    return found


PATHS = _paths()


def test_the_tree_holds_the_documented_groups() -> None:
    tops = {p[0] for p in PATHS if len(p) == 1}
    assert {"stack", "db", "watch", "provision", "worker", "card", "api", "demo", "status", "jobs"} <= tops
    assert {("card", "bs"), ("card", "coh"), ("provision", "scale")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "cbmflow")
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Usage:" in result.output
