"""``cbmflow worker``: consume extraction jobs until stopped or drained."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import typer

AUTOGROUP = Path("/proc/self/autogroup")


def autogroup_nice() -> int | None:
    """The niceness of this session's autogroup, or None where there is none to change: a kernel
    without autogroups (no file), or a session the kernel left in its default group (the file
    reads empty), as for a process whose session no ``setsid`` created since boot (CI's runner).
    A new session always gets its own group."""
    try:
        fields = AUTOGROUP.read_text().split()
        return int(fields[-1]) if fields else None
    except (OSError, ValueError):
        return None


def yield_cpu(nice: int) -> int:
    """Run at niceness ``nice`` (or the higher one inherited): the API answers within milliseconds
    only if a decode loop does not hold its core for a whole time slice. Linux keeps niceness per
    thread and new threads inherit it, so this runs before numba, GDAL or the heartbeat start any.

    With the kernel's session autogroups (the default on desktop and cloud kernels) a thread's
    niceness only ranks it inside its session, and the local driver and ``setsid`` in the
    user-data start every worker in a session of its own: a worker that leads its session
    lowers the session's weight too, else it would still get a full share against the API's."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    group = autogroup_nice()
    if group is not None and group < nice and os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):  # not ours to change (another user's session)
            AUTOGROUP.write_text(str(nice))
    return os.getpriority(os.PRIO_PROCESS, 0)


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        max_jobs: int = typer.Option(0, "--max-jobs", help="Exit after this many jobs (0 = never)."),
        idle_exit_s: float = typer.Option(-1.0, "--idle-exit", help="Exit after this many idle seconds (0 = never)."),
    ) -> None:
        """Consume ExtractParcels jobs (prefetch 1, manual ack) and write parcel statistics."""
        from cbmflow.settings import WorkerSettings

        settings = WorkerSettings()
        yield_cpu(settings.nice)
        if settings.threads:
            # Before numba and GDAL load: both size their thread pools once, at import.
            os.environ["NUMBA_NUM_THREADS"] = str(settings.threads)
            os.environ["GDAL_NUM_THREADS"] = str(settings.threads)
        from worker.consumer import Worker

        if idle_exit_s >= 0:
            settings = settings.model_copy(update={"idle_exit_s": idle_exit_s})
        raise typer.Exit(Worker(settings=settings, max_jobs=max_jobs).run())
