"""``cbmflow watch --interval S``: the polling loop, its stop handling and its Prometheus metrics.

SIGTERM/SIGINT set a stop event that every catalogue request checks before it is sent and that
the sleep between cycles waits on, so a stop takes effect between two requests, never in the
middle of a transaction: what was committed (scenes, outbox, cursor) stays, and the next start
resumes from the cursors.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from catalog_watcher.http import WatchStopped
from catalog_watcher.service import ScanFailed, WatchReport, watch_once
from cbmflow.logging import get_logger
from cbmflow.settings import WatchSettings

log = get_logger("watch")


class WatchMetrics:
    """The watcher's series, in a registry of its own (tests run several loops in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.polls = Counter("cbmflow_watch_polls", "Watch cycles, by result", ["result"], registry=r)
        self.items = Counter("cbmflow_watch_items_seen", "Catalogue items read", registry=r)
        self.rejected = Counter("cbmflow_watch_items_rejected", "Items that could not be normalised", registry=r)
        self.scenes = Counter("cbmflow_watch_scenes", "Scenes recorded, by outcome", ["outcome"], registry=r)
        self.published = Counter(
            "cbmflow_watch_jobs_published", "ExtractParcels jobs confirmed by the broker", registry=r
        )
        self.requests = Counter("cbmflow_watch_requests", "Catalogue HTTP requests, by source", ["source"], registry=r)
        self.lag = Gauge(
            "cbmflow_watch_cursor_lag_seconds", "Now minus the oldest cursor of the source", ["source"], registry=r
        )
        self.pending = Gauge("cbmflow_watch_outbox_pending", "Outbox rows not yet confirmed", registry=r)

    def record(self, report: WatchReport) -> None:
        self.items.inc(report.seen)
        self.rejected.inc(len(report.rejected))
        for outcome in ("new", "changed", "superseded", "duplicates"):
            self.scenes.labels(outcome).inc(getattr(report, outcome))
        self.published.inc(report.published)
        for source, n in report.requests.items():
            self.requests.labels(source).inc(n)
        for source, lag in report.cursor_lag_s.items():
            self.lag.labels(source).set(lag)
        self.pending.set(report.pending)


def install_stop_handlers(stop: threading.Event) -> None:
    def _handler(signum: int, frame: FrameType | None) -> None:
        log.info("watch.stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def watch_forever(
    interval_s: float,
    settings: WatchSettings,
    stop: threading.Event | None = None,
    metrics: WatchMetrics | None = None,
    **kwargs: Any,
) -> int:
    """Poll every ``interval_s`` until ``stop`` is set; returns the number of cycles run.

    A failed cycle is logged and retried at the next tick: a catalogue or broker outage must
    not end the daemon.
    """
    stop = stop or threading.Event()
    metrics = metrics or WatchMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    cycles = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            report = watch_once(settings=settings, stop=stop, **kwargs)
            metrics.record(report)
            metrics.polls.labels("ok").inc()
        except ScanFailed as exc:  # logged by watch_once (watch.scan_failed); the rest of the cycle ran
            metrics.record(exc.report)
            metrics.polls.labels("partial").inc()
        except WatchStopped:
            metrics.polls.labels("stopped").inc()
            break
        except Exception as exc:  # noqa: BLE001 - a daemon loop must survive one bad cycle
            metrics.polls.labels("failed").inc()
            log.error("watch.cycle_failed", error=str(exc), error_type=type(exc).__name__)
        cycles += 1
        stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
    log.info("watch.stopped", cycles=cycles)
    return cycles
