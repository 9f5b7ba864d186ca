"""A polite HTTP session for catalogue requests: paced, budgeted, retried, stoppable.

Catalogues rate-limit (CDSE answers 429 with ``Retry-After`` above a few requests per second)
and pystac-client's default retry does not retry a POST on 429, so one busy moment would end a
whole cycle. Every request of a source, GET or POST, STAC or OData, goes through one
:class:`PoliteSession`: it waits ``1/rate`` between requests, retries 429/5xx and network errors
with exponential backoff that honours ``Retry-After``, stops at a per-cycle request budget, and
checks the stop event between requests so SIGTERM never waits for a whole scan.
"""

from __future__ import annotations

import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from cbmflow.errors import CbmflowError
from cbmflow.logging import get_logger

log = get_logger("watch")

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RequestBudgetExceeded(CbmflowError):
    """The source's request budget for this cycle is spent; the next cycle resumes at the cursor."""


class WatchStopped(CbmflowError):
    """A stop was asked for (SIGTERM) between two requests."""


def retry_after_s(resp: requests.Response) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), or None."""
    raw = resp.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class PoliteSession(requests.Session):
    def __init__(
        self,
        source: str,
        *,
        rate_per_s: float = 4.0,
        budget: int = 1000,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_wait_s: float = 120.0,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.min_interval_s = 1.0 / rate_per_s
        self.budget = budget
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.stop = stop or threading.Event()
        self.requests_sent = 0
        self.retries = 0
        self._last = 0.0

    def _wait(self, seconds: float) -> None:
        if seconds > 0 and self.stop.wait(seconds):
            raise WatchStopped(f"{self.source}: stopped")

    def _before_request(self) -> None:
        if self.stop.is_set():
            raise WatchStopped(f"{self.source}: stopped")
        if self.requests_sent >= self.budget:
            raise RequestBudgetExceeded(f"{self.source}: request budget of {self.budget} spent")
        self._wait(self._last + self.min_interval_s - time.monotonic())
        self._last = time.monotonic()
        self.requests_sent += 1

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        attempt = 0
        while True:
            self._before_request()
            try:
                resp = super().send(request, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt >= self.max_retries:
                    raise
                wait, why = self.backoff_s * 2**attempt, type(exc).__name__
            else:
                if resp.status_code not in RETRY_STATUS or attempt >= self.max_retries:
                    return resp
                hinted = retry_after_s(resp)
                wait = hinted if hinted is not None else self.backoff_s * 2**attempt
                why = str(resp.status_code)
                resp.close()
            wait = min(wait, self.max_wait_s)
            attempt += 1
            self.retries += 1
            log.warning(
                "watch.http_retry", source=self.source, url=request.url, method=request.method, why=why, wait_s=wait
            )
            self._wait(wait)
