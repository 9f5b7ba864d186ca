"""What the routes share: the connection pool, the dataset cache, the app state, the
authenticated call and the route wrapper (metrics, retries, the error contract).

Route modules import this and ``api.errors``, never ``api.app``: the app factory includes their
routers, so the package has no import cycle (titiler's factory/app split).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from prometheus_client import Counter, Histogram
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.aiodb import AsyncPool
from api.auth import (
    AuthenticationError,
    Authenticator,
    InsecureTransportError,
    LoginThrottle,
    SharedLoginThrottle,
    User,
    VerificationGuard,
    basic_name,
    is_local_peer,
)
from api.errors import ServiceUnavailableError, response_for
from api.params import Param, Params
from api.prepared import PreparingConnection
from cbmflow.db import Cursor, Dataset, list_datasets
from cbmflow.logging import get_logger
from cbmflow.settings import ApiSettings

log = get_logger("api")

# Labelled by route template and status only: a tenant's parcel ids never reach the metrics.
REQUESTS = Counter("cbmflow_api_requests_total", "API requests answered", ["route", "status"])
LATENCY = Histogram(
    "cbmflow_api_request_seconds",
    "API request handling time (database and serialisation, not network)",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


def statement_timeout_ms(seconds: float) -> int:
    """PostgreSQL's ``statement_timeout`` (milliseconds, 0 = none) for a timeout in seconds.

    Rounded up, so a positive sub-millisecond setting still limits queries instead of becoming
    "no timeout" (0.5 s is 500 ms, not ``int(0.5) = 0``)."""
    return 0 if seconds <= 0 else max(1, math.ceil(seconds * 1000))


class Pool:
    """A blocking pool of autocommit, read-only connections that are kept, never churned.

    psycopg2's ThreadedConnectionPool closes every connection returned while ``minconn`` are
    already idle, so under concurrent load (minconn 1) nearly every request opened a new
    PostgreSQL session: a backend fork and a SCRAM exchange, more than the query itself. Here a
    connection is opened on demand up to ``size`` and then reused until it breaks.

    Sessions are autocommit: every route only reads, so a transaction buys nothing, and in a
    transaction psycopg2 spends two extra round trips per request (BEGIN, then the ROLLBACK that
    hands the connection back). Statements of one request therefore each see the latest committed
    data. Connections are read-only and carry a statement timeout, so the API can never write and a
    pathological query cannot hold a connection for ever.
    """

    def __init__(self, dsn: str, size: int, statement_timeout_s: float) -> None:
        parsed = psycopg2.extensions.parse_dsn(dsn)
        options = " ".join(
            o
            for o in (
                parsed.get("options", ""),
                "-c default_transaction_read_only=on",
                f"-c statement_timeout={statement_timeout_ms(statement_timeout_s)}",
            )
            if o
        )
        self._dsn: str = psycopg2.extensions.make_dsn(
            dsn,
            options=options,
            application_name=parsed.get("application_name", "cbmflow-api"),
            connect_timeout=parsed.get("connect_timeout", "10"),
        )
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[PreparingConnection] = [self._connect()]  # a wrong DSN fails at startup, not on a request
        self._closed = False

    @property
    def dsn(self) -> str:
        """The DSN with the pool's session options (read-only, statement timeout, name)."""
        return self._dsn

    def _connect(self) -> PreparingConnection:
        conn: PreparingConnection = psycopg2.connect(self._dsn, connection_factory=PreparingConnection)
        conn.autocommit = True
        return conn

    @contextmanager
    def cursor(self, wait_s: float = 30.0) -> Iterator[Cursor]:
        if not self._slots.acquire(timeout=wait_s):
            raise ServiceUnavailableError("no database connection free")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
        except Exception:
            self._slots.release()
            raise
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            # A dead connection (server restarted, idle connection cut) is dropped, not reused.
            broken = bool(conn.closed) or conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN
            with self._lock:
                keep = not broken and not self._closed
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class DatasetCache:
    """The ``datasets`` table, re-read at most every ``ttl_s`` seconds instead of on every request.

    Every dataset route resolved (aoi, year) → schema and tables with one query per request, a
    quarter of parcelTimeSeries' round trips. The table changes only when an operator imports
    parcels, so a dataset created (or dropped) is seen up to ``ttl_s`` late; 0 turns the cache
    off. Grants are *not* cached: they are read with the user row on every request.
    """

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = max(0.0, float(ttl_s))
        self._lock = threading.Lock()
        self._table: dict[tuple[str, int], Dataset] = {}
        self._expires = -math.inf

    def _current(self, cur: Cursor) -> dict[tuple[str, int], Dataset]:
        now = time.monotonic()
        with self._lock:
            if now < self._expires:
                return self._table
        table = {(ds.aoi, ds.year): ds for ds in list_datasets(cur)}
        with self._lock:
            self._table, self._expires = table, now + self._ttl_s
        return table

    def get(self, cur: Cursor, aoi: str, year: int) -> Dataset | None:
        return self._current(cur).get((aoi, year))

    def fresh(self, aoi: str, year: int) -> Dataset | None:
        """The dataset when the cached table is fresh and holds it; None otherwise (the caller then
        takes the path that can read the table), so this never touches the database."""
        with self._lock:
            if time.monotonic() < self._expires:
                return self._table.get((aoi, year))
        return None

    def all(self, cur: Cursor) -> list[Dataset]:
        return sorted(self._current(cur).values(), key=lambda ds: (ds.aoi, ds.year))

    def invalidate(self) -> None:
        with self._lock:
            self._expires = -math.inf


@dataclass
class AppState:
    """What one app instance owns, on ``app.state.cbmflow`` once the lifespan has started."""

    settings: ApiSettings
    pool: Pool
    aio: AsyncPool
    auth: Authenticator
    polygon_limit: int
    chip_secret: bytes
    datasets: DatasetCache
    throttle: LoginThrottle
    shared_throttle: SharedLoginThrottle


def state_of(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "cbmflow", None)
    if state is None:
        raise ServiceUnavailableError("the API is not started (lifespan not run)")
    return state


@dataclass
class Call:
    """One authenticated request: its cursor, its user and its parameters."""

    cur: Cursor
    user: User
    request: Request
    state: AppState


def client_address(request: Request) -> str:
    """The peer's address ('' for a Unix socket): the throttle's per-address key."""
    return request.client.host if request.client is not None else ""


def check_transport(request: Request, settings: ApiSettings) -> None:
    """Refuse credentials that crossed a network in clear text.

    Basic auth and tokens are replayable secrets: over plain HTTP anyone on the path reads them.
    Loopback stays allowed (local use, the JRC client's tests, a TLS reverse proxy on the same
    host), as does anything with ``CBMFLOW_API_ALLOW_PLAIN_BASIC`` (a proxy on another host on a
    trusted network). The refusal is a 403 that says what to do, not a 401 that invites a retry.
    """
    if (
        request.url.scheme == "http"
        and not settings.allow_plain_basic
        and request.headers.get("authorization")
        and not is_local_peer(client_address(request))
    ):
        raise InsecureTransportError(
            "credentials over plain HTTP are refused: use HTTPS (cbmflow api --tls-cert/--tls-key or a TLS"
            " reverse proxy), or set CBMFLOW_API_ALLOW_PLAIN_BASIC=true on a trusted network"
        )


@contextmanager
def authenticated(request: Request) -> Iterator[Call]:
    """Borrow a connection, authenticate the caller on it, and keep it for the request's queries.

    Failed logins are throttled (:class:`~api.auth.LoginThrottle` in this process, then
    :class:`~api.auth.SharedLoginThrottle` across processes and hosts just before a password is
    verified): a locked caller gets 429 before any password is verified, so a locked-out guesser
    costs no argon2 run."""
    state = state_of(request)
    check_transport(request, state.settings)
    header = request.headers.get("authorization")
    name, address = basic_name(header), client_address(request)
    state.throttle.check(name, address)
    with state.pool.cursor() as cur:
        guard = VerificationGuard(state.shared_throttle, cur, name, address)
        try:
            user = state.auth.authenticate(cur, header, guard)
        except AuthenticationError:
            state.throttle.failed(name, address, header or "")
            if guard.ran:
                state.shared_throttle.failed(cur, name, address, header or "")
            raise
        # The shared record is cleared after a verification, or where this process saw the
        # failures (a password verified recently needs none): not a write on every request.
        if name and (state.throttle.succeeded(name, address) or guard.ran):
            state.shared_throttle.succeeded(cur, name, address)
        request.state.user = user
        yield Call(cur=cur, user=user, request=request, state=state)


FastPath = Callable[[Request, Params], Awaitable[Response | None]]
Handler = Callable[[Request, Params], Response]


@dataclass(frozen=True)
class Endpoint:
    """One GET route: its handler, its declared parameters and what the OpenAPI document says.

    ``params`` is the single declaration of the route's parameters: :func:`route` hands the
    handler a :class:`~api.params.Params` that reads only these, and ``api.openapi`` renders them.
    ``content`` maps media types to response schemas; ``auth``/``found`` say whether 401/403 and
    404 are possible. ``fast`` is an optional event-loop path (see :func:`route`).
    """

    path: str
    handler: Handler
    summary: str
    content: dict[str, Any]
    params: Sequence[Param] = ()
    auth: bool = True
    found: bool = True
    tag: str = "v1"
    fast: FastPath | None = field(default=None, compare=False)


def route(endpoint: Endpoint) -> Route:
    """The Starlette route of ``endpoint``; with ``endpoint.fast``, an async endpoint that first
    tries it on the event loop (see api/aiodb.py) and falls back to the handler in the thread pool
    when it answers None (a request it does not cover) or loses its database connection."""
    path, handler, fast = endpoint.path, endpoint.handler, endpoint.fast

    def params(request: Request) -> Params:
        return Params(request.query_params, endpoint.params, request.path_params)

    def sync_endpoint(request: Request) -> Response:
        started = time.perf_counter()
        response = _answer(request)
        LATENCY.labels(path).observe(time.perf_counter() - started)
        REQUESTS.labels(path, str(response.status_code)).inc()
        return response

    async def fast_endpoint(request: Request) -> Response:
        assert fast is not None
        started = time.perf_counter()
        response: Response | None
        try:
            response = await fast(request, params(request))
        except psycopg2.errors.QueryCanceled as exc:
            response = response_for(request, exc)
        except (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.errors.UndefinedTable) as exc:
            # The sync path retries once on a fresh connection and re-reads a dropped dataset.
            log.warning("api.db_retry", path=request.url.path, error=type(exc).__name__)
            state = getattr(request.app.state, "cbmflow", None)
            if state is not None and isinstance(exc, psycopg2.errors.UndefinedTable):
                state.datasets.invalidate()
            response = None
        except Exception as exc:
            response = response_for(request, exc)
        if response is None:
            response = await run_in_threadpool(_answer, request)
        LATENCY.labels(path).observe(time.perf_counter() - started)
        REQUESTS.labels(path, str(response.status_code)).inc()
        return response

    def _answer(request: Request) -> Response:
        # A sync endpoint: Starlette runs it in its threadpool, where blocking DB calls belong.
        # Every handler only reads, so one retry after a lost connection (database restarted,
        # idle connection cut) is safe and hides the stale pooled connection from the client.
        for attempt in (1, 2):
            try:
                return handler(request, params(request))
            except psycopg2.errors.QueryCanceled as exc:
                return response_for(request, exc)
            except psycopg2.errors.UndefinedTable as exc:
                # A dataset dropped while its row was still cached: re-read the table and retry.
                state = getattr(request.app.state, "cbmflow", None)
                if attempt == 2 or state is None:
                    return response_for(request, exc)
                state.datasets.invalidate()
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                if attempt == 2:
                    return response_for(request, exc)
                log.warning("api.db_retry", path=request.url.path, error=type(exc).__name__)
            except Exception as exc:
                return response_for(request, exc)
        raise AssertionError("unreachable")

    chosen: Callable[[Request], Any] = sync_endpoint if fast is None else fast_endpoint
    chosen.__name__ = handler.__name__
    chosen.__doc__ = handler.__doc__
    return Route(path, chosen, methods=["GET"])
