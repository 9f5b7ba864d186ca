"""The worker yields CPU to the API and the database on a shared host (``CBMFLOW_WORKER_NICE``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import worker.cli as worker_cli
from worker.cli import autogroup_nice

CHILD = """
import os, threading
from worker.cli import yield_cpu
print(yield_cpu(int(os.environ["WANT"])))
seen = []
t = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
t.start(); t.join()
print(seen[0])
"""


def _child(want: int, start_nice: int = 0) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**os.environ, "WANT": str(want)},
        preexec_fn=(lambda: os.nice(start_nice)) if start_nice else None,  # noqa: PLW1509 - nice only
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [int(v) for v in out.stdout.split()]


def test_raises_niceness_and_threads_inherit_it() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    want = min(base + 7, 19)
    assert _child(want) == [want, want]


def test_never_lowers_an_inherited_niceness() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    start = min(base + 15, 19)
    assert _child(max(base, start - 5), start_nice=start - base) == [start, start]


def _nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


def test_worker_command_runs_at_the_setting(tmp_path: Path) -> None:
    """The real ``cbmflow worker``, with no broker to reach: it retries, at the niceness asked for."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    want = min(os.getpriority(os.PRIO_PROCESS, 0) + 4, 19)
    env = {
        **os.environ,
        "CBMFLOW_WORKER_NICE": str(want),
        "CBMFLOW_BUS_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed}/%2F",
        "CBMFLOW_DB_DSN": f"postgresql://nobody@127.0.0.1:{closed}/none",
        "CBMFLOW_STATE_DIR": str(tmp_path),
    }
    cbmflow = str(Path(sys.executable).parent / "cbmflow")
    proc = subprocess.Popen([cbmflow, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        seen = _nice_of(proc.pid)
        while seen != want and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            seen = _nice_of(proc.pid)
        assert seen == want
    finally:
        proc.kill()
        proc.wait(10)


def test_a_session_leader_lowers_its_autogroup() -> None:
    """Each worker leads its own session (local driver, user-data's setsid); with autogroups its
    thread niceness alone would not rank it below the API's session. The new session gets a group
    of its own even where ours is the kernel's default one (whose file reads empty, as on CI's
    runner); only a kernel without autogroups has none, and then the thread niceness must still be
    set and nothing may fail."""
    base = autogroup_nice()
    start = os.getpriority(os.PRIO_PROCESS, 0)
    want = min(max(base if base is not None else start, start) + 6, 19)
    code = CHILD + "from worker.cli import autogroup_nice\nprint(autogroup_nice())\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "WANT": str(want)},
        start_new_session=True,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    yielded, thread, group = out.stdout.split()
    assert (int(yielded), int(thread)) == (want, want)
    if group == "None":
        assert not worker_cli.AUTOGROUP.exists()  # only a kernel without autogroups has none
    else:
        assert int(group) == want
    assert autogroup_nice() == base  # ours, a different session, is untouched


def test_autogroup_nice_reads_none_where_the_file_is_empty_or_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session left in the kernel's default group (CI's runner) has /proc/self/autogroup, but
    it reads empty."""
    empty = tmp_path / "autogroup"
    empty.write_text("")
    monkeypatch.setattr(worker_cli, "AUTOGROUP", empty)
    assert worker_cli.autogroup_nice() is None
    monkeypatch.setattr(worker_cli, "AUTOGROUP", tmp_path / "absent")
    assert worker_cli.autogroup_nice() is None
    empty.write_text("/autogroup-7 nice 3\n")
    monkeypatch.setattr(worker_cli, "AUTOGROUP", empty)
    assert worker_cli.autogroup_nice() == 3
