"""Prometheus metrics of one worker process, served on ``/metrics``.

Each worker serves its own endpoint (pull model), because a worker is a short-lived process or
VM and a push gateway would keep reporting the dead ones. Several local workers share one
machine, so the default port is ephemeral and the port actually bound is recorded in the
``workers`` registry, where a scraper's service discovery (or ``cbmflow status``) finds it.

Label values are a small closed set (results and failure reasons, never scene ids or error
texts), so the number of series stays bounded however many jobs a worker runs.
"""

from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cbmflow.logging import get_logger

log = get_logger("worker")

RESULTS = ("extracted", "no_parcels", "duplicate")
"""How a job can end well: written, nothing to write, or already done by someone else."""

REASONS = (
    "malformed",
    "unknown_scene",
    "unsupported",
    "product",
    "delivery_limit",
    "database",
    "io",
    "unexpected",
    "stopping",
)
"""Why a job can fail; ``delivery_limit`` is a transient failure on the last delivery the broker allows."""

VERDICTS = ("dead_letter", "requeue")

# Jobs run from a fraction of a second (the test world) to an hour (a full S2 tile, many datasets).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class WorkerMetrics:
    """The worker's series, in a registry of its own so two workers in one process (tests) never
    share counters."""

    def __init__(self, worker_id: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_done = Counter("cbmflow_worker_jobs_done", "Jobs acknowledged, by result", ["result"], registry=r)
        self.jobs_failed = Counter(
            "cbmflow_worker_jobs_failed",
            "Failed job deliveries, by reason and verdict",
            ["reason", "verdict"],
            registry=r,
        )
        self.job_duration = Histogram(
            "cbmflow_worker_job_duration_seconds",
            "Wall time of a job from delivery to verdict, by outcome (a result or failed)",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.busy = Gauge("cbmflow_worker_busy", "1 while a job runs", registry=r)
        self.reconnects = Counter(
            "cbmflow_worker_reconnects", "Reconnects after a lost AMQP connection or channel", registry=r
        )
        self.settles_lost = Counter(
            "cbmflow_worker_settles_lost",
            "Verdicts that could not reach the broker because the channel died under the job (it redelivers)",
            registry=r,
        )
        info = Gauge("cbmflow_worker_info", "Constant 1, labelled with the worker id", ["worker_id"], registry=r)
        info.labels(worker_id).set(1)
        # Series exist (at 0) from the start, so a rate() over a fresh worker is defined.
        for result in RESULTS:
            self.jobs_done.labels(result)
            self.job_duration.labels(result)
        self.job_duration.labels("failed")
        for reason in REASONS:
            for verdict in VERDICTS:
                self.jobs_failed.labels(reason, verdict)

    def serve(self, host: str, port: int) -> int | None:
        """Start ``/metrics`` on ``host:port`` and return the port bound; None when disabled (port < 0).

        A fixed port already in use (two local workers given the same setting) falls back to an
        ephemeral one instead of failing the worker: metrics are not worth losing a worker over.
        """
        if port < 0:
            return None
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                log.warning("worker.metrics_failed", host=host, port=port, error=str(exc))
                return None
            log.warning("worker.metrics_port_busy", host=host, port=port, fallback="ephemeral")
            server, _ = start_http_server(0, addr=host, registry=self.registry)
        bound = int(server.server_port)
        log.info("worker.metrics", url=f"http://{host}:{bound}/metrics")
        return bound
