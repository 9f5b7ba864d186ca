"""Pieces of the worker that need no server: the retry backoff and the Prometheus endpoint."""

from __future__ import annotations

import requests

from worker.consumer import backoff_s
from worker.metrics import WorkerMetrics


def test_backoff_doubles_from_one_second_up_to_the_ceiling() -> None:
    for attempt, nominal in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 30.0)]:
        for _ in range(50):
            assert 0.8 * nominal <= backoff_s(attempt, 30.0) <= nominal


def test_metrics_are_served_and_a_taken_port_falls_back_to_an_ephemeral_one() -> None:
    first = WorkerMetrics("w-a")
    port = first.serve("127.0.0.1", 0)
    assert port is not None
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'cbmflow_worker_jobs_done_total{result="extracted"} 0.0' in text
    assert 'cbmflow_worker_jobs_failed_total{reason="malformed",verdict="dead_letter"} 0.0' in text
    assert 'cbmflow_worker_info{worker_id="w-a"} 1.0' in text
    assert "cbmflow_worker_job_duration_seconds_bucket" in text
    other = WorkerMetrics("w-b").serve("127.0.0.1", port)
    assert other is not None and other != port
    assert WorkerMetrics("w-c").serve("127.0.0.1", -1) is None
