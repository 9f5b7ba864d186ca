"""Logs read well for whoever reads them: console lines at a terminal, JSON lines everywhere else.

Workers under the local driver and on VMs write to files and journald, where a parser expects one
JSON object per line; a person at a terminal (``make demo``, ``cbmflow worker`` run by hand) gets
the console renderer. A stray plain-text library line would break the first and clutter the second.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cbmflow import logging as cbmlog
from cbmflow.settings import LogSettings, settings_table

ANSI = re.compile(r"\x1b\[[0-9;]*[a-zA-Z]")
EMIT = (
    "import logging; from cbmflow.logging import get_logger; "
    "get_logger('worker', worker_id='w-1').info('scene.extracted', scene_id=7, parcels=12); "
    "logging.getLogger('somelib').warning('library says %s', 'hello')"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test reconfigures the process; the next test gets the process default back. Keys bound
    to this thread's context by earlier tests (a worker run in the test's own thread) are cleared,
    so the expected lines hold in any order."""
    structlog.contextvars.clear_contextvars()
    yield
    cbmlog.configure(force=True)


def _read_pty(master: int) -> str:
    chunks = []
    while select.select([master], [], [], 0.2)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:  # the slave side closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBMFLOW_LOG_")}
    env.update(extra)
    return env


def _run_child(stderr_tty: bool, **env: str) -> str:
    """stderr of a child process that logs one event of ours and one library record."""
    if not stderr_tty:
        proc = subprocess.run(
            [sys.executable, "-c", EMIT], env=_child_env(**env), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    master, slave = pty.openpty()
    try:
        proc2 = subprocess.Popen([sys.executable, "-c", EMIT], env=_child_env(**env), stderr=slave)
        os.close(slave)
        slave = -1
        assert proc2.wait(timeout=60) == 0
        return _read_pty(master)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_auto_renders_console_lines_on_a_terminal() -> None:
    out = _run_child(stderr_tty=True)
    plain = ANSI.sub("", out)
    assert "{" not in plain, out
    assert ANSI.search(out), "a terminal gets colours"
    ours = next(line for line in plain.splitlines() if "scene.extracted" in line)
    assert "[info" in ours
    assert "scene_id=7" in ours and "parcels=12" in ours and "worker_id=w-1" in ours and "component=worker" in ours
    lib = next(line for line in plain.splitlines() if "library says hello" in line)
    assert "[warning" in lib and "somelib" in lib


def test_auto_writes_json_lines_when_stderr_is_not_a_terminal() -> None:
    lines = _run_child(stderr_tty=False).splitlines()
    records = [json.loads(line) for line in lines]  # every line, the library's too, is JSON
    ours = next(r for r in records if r["event"] == "scene.extracted")
    assert ours["scene_id"] == 7 and ours["parcels"] == 12 and ours["worker_id"] == "w-1"
    assert ours["component"] == "worker" and ours["level"] == "info" and ours["timestamp"].endswith("Z")
    lib = next(r for r in records if r["event"] == "library says hello")
    assert lib["logger"] == "somelib" and lib["level"] == "warning"


@pytest.mark.parametrize(("fmt", "tty"), [("json", True), ("console", False)])
def test_an_explicit_format_wins_over_the_terminal_check(fmt: str, tty: bool) -> None:
    out = _run_child(stderr_tty=tty, CBMFLOW_LOG_FORMAT=fmt.upper())
    line = next(line for line in out.splitlines() if "scene.extracted" in line)
    if fmt == "json":
        assert json.loads(line)["scene_id"] == 7
    else:
        assert not ANSI.search(out), "no colour codes into a file"
        assert "{" not in line and "scene_id=7" in line


def test_choose_format() -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty, io.StringIO() as buf:
        assert cbmlog.choose_format("auto", tty) == "console"
        assert cbmlog.choose_format("auto", buf) == "json"
        assert cbmlog.choose_format("json", tty) == "json"
        assert cbmlog.choose_format("console", buf) == "console"
    os.close(master)
    closed = io.StringIO()
    closed.close()
    assert cbmlog.choose_format("auto", closed) == "json"


def test_json_format_keeps_keys_and_exceptions() -> None:
    buf = io.StringIO()
    cbmlog.configure(level="DEBUG", fmt="json", stream=buf, force=True)
    log = cbmlog.get_logger("provisioner", pool="default")
    log.debug("provision.plan", want=3, have=1)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("provision.failed", worker_id="w-2")
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first == {
        "component": "provisioner",
        "pool": "default",
        "want": 3,
        "have": 1,
        "event": "provision.plan",
        "level": "debug",
        "timestamp": first["timestamp"],
    }
    assert second["event"] == "provision.failed" and second["level"] == "error"
    assert "RuntimeError: boom" in second["exception"]


def test_console_format_shows_event_and_keys_without_json() -> None:
    buf = io.StringIO()
    cbmlog.configure(level="INFO", fmt="console", stream=buf, force=True)
    cbmlog.get_logger("watch").info("watch.published", scene_id="S2A_X", jobs=2)
    line = buf.getvalue().strip()
    assert "{" not in line and not ANSI.search(line)
    assert re.search(r"\[info\s*\] watch\.published\s+component=watch jobs=2 scene_id=S2A_X$", line), line


def test_reconfiguring_reaches_loggers_created_before() -> None:
    """The demo quietens its process after modules created their loggers at import time."""
    early = cbmlog.get_logger("stack")
    buf = io.StringIO()
    cbmlog.configure(level="WARNING", fmt="json", stream=buf, force=True)
    early.info("stack.up")
    logging.getLogger("somelib").info("chatter")
    early.warning("stack.slow", s=12)
    events = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert events == ["stack.slow"]


def test_an_invalid_log_setting_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_LOG_LEVEL", "verbose")
    monkeypatch.setenv("CBMFLOW_LOG_FORMAT", "json")
    buf = io.StringIO()
    cbmlog.configure(stream=buf, force=True)
    cbmlog.get_logger("worker").debug("hidden")
    cbmlog.get_logger("worker").info("shown")
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["log.settings_invalid", "shown"]
    assert "verbose" in records[0]["error"] and records[0]["using"] == "level=INFO format=json"


def test_log_settings_are_documented_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_LOG_LEVEL", "warning")
    monkeypatch.setenv("CBMFLOW_LOG_FORMAT", "Console")
    s = LogSettings()
    assert (s.level, s.format) == ("WARNING", "console")
    rows = {env: default for env, default, _ in settings_table()}
    assert rows["CBMFLOW_LOG_LEVEL"] == "INFO" and rows["CBMFLOW_LOG_FORMAT"] == "auto"


def test_generating_a_world_prints_no_library_chatter(tmp_path: Path) -> None:
    """pyogrio logs "Created N records" at INFO for every layer the test-world generator writes."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbmflow",
            "demo-data",
            "--out",
            str(tmp_path / "w"),
            "--parcels",
            "12",
            "--scenes",
            "1",
        ],
        env=_child_env(CBMFLOW_LOG_LEVEL="INFO"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w" / "parcels.gpkg").exists()
    assert "Created" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("test world in "), proc.stdout
