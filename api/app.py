"""The Starlette application: an app factory, a connection pool and the error contract.

Nothing is built at import (titiler style): ``create_app(dsn)`` returns a fresh app, so tests and
uvicorn workers each get their own pool and auth cache. The pool is opened by the lifespan, not
at construction, so building an app never touches the network.

Error contract (JRC answered ``{}`` with 200 or an HTML 500): every failure is JSON
``{"error": {"code": ..., "message": ...}}`` with the status of the table below, and bad user
input is always a 4xx, never a 500.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.aiodb import AsyncPool
from api.auth import AuthenticationError, Authenticator, User
from api.prepared import PreparingConnection
from cbmflow.db import Dataset, list_datasets
from cbmflow.errors import CbmflowError, InvalidInputError, NotFoundError, PermissionDeniedError
from cbmflow.logging import get_logger
from cbmflow.settings import ApiSettings, DbSettings
from cbmflow.store import StoreUnavailable

log = get_logger("api")

WWW_AUTHENTICATE = 'Basic realm="cbmflow"'

# exception → (HTTP status, stable error code). Looked up along the exception's MRO.
STATUS_CODES: dict[type[BaseException], tuple[int, str]] = {
    InvalidInputError: (400, "invalid_input"),
    AuthenticationError: (401, "unauthorized"),
    PermissionDeniedError: (403, "forbidden"),
    NotFoundError: (404, "not_found"),
}

_HTTP_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    414: "uri_too_long",
}


# Labelled by route template and status only: a tenant's parcel ids never reach the metrics.
REQUESTS = Counter("cbmflow_api_requests_total", "API requests answered", ["route", "status"])
LATENCY = Histogram(
    "cbmflow_api_request_seconds",
    "API request handling time (database and serialisation, not network)",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


class ServiceUnavailableError(CbmflowError):
    """The database cannot be reached or every pooled connection stayed busy (HTTP 503)."""


def _setting(settings: ApiSettings, name: str, default: int) -> int:
    # Read when ApiSettings grows the field (CBMFLOW_API_<NAME>); the default applies until then.
    return int(getattr(settings, name, default))


class ApiJSONResponse(JSONResponse):
    """JSON that keeps non-ASCII parcel ids and crop names readable."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if status == 401 else None
    return ApiJSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def response_for(request: Request, exc: BaseException) -> JSONResponse:
    """Map any exception to the JSON error contract; unexpected ones are logged and kept generic."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            status, code = STATUS_CODES[cls]
            return error_response(status, code, str(exc) or code)
    if isinstance(exc, HTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        resp = error_response(exc.status_code, code, str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        log.warning("api.query_timeout", path=request.url.path)
        return error_response(503, "timeout", "the query took too long; narrow it down")
    if isinstance(exc, psycopg2.errors.DataError):
        # A value PostgreSQL refused (e.g. a coordinate PROJ cannot transform): the input's fault.
        log.info("api.data_error", path=request.url.path, error=str(exc).splitlines()[0] if str(exc) else "")
        return error_response(400, "invalid_input", "a parameter value was rejected by the database")
    if isinstance(exc, StoreUnavailable):
        log.error("api.store_unavailable", path=request.url.path, error=str(exc)[:200])
        return error_response(503, "unavailable", "the object store is unavailable; retry later")
    if isinstance(exc, ServiceUnavailableError | psycopg2.OperationalError | psycopg2.InterfaceError):
        log.error("api.db_unavailable", path=request.url.path, error=type(exc).__name__)
        return error_response(503, "unavailable", "the database is unavailable; retry later")
    log.error("api.internal_error", path=request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


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

    def __init__(self, dsn: str, size: int, statement_timeout_s: int) -> None:
        parsed = psycopg2.extensions.parse_dsn(dsn)
        options = " ".join(
            o
            for o in (
                parsed.get("options", ""),
                "-c default_transaction_read_only=on",
                f"-c statement_timeout={max(0, statement_timeout_s) * 1000}",
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
        self._idle: list[Any] = [self._connect()]  # a wrong DSN fails at startup, not on a request
        self._closed = False

    @property
    def dsn(self) -> str:
        """The DSN with the pool's session options (read-only, statement timeout, name)."""
        return self._dsn

    def _connect(self) -> Any:
        conn = psycopg2.connect(self._dsn, connection_factory=PreparingConnection)
        conn.autocommit = True
        return conn

    @contextmanager
    def cursor(self, wait_s: float = 30.0) -> Iterator[Any]:
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

    def _current(self, cur: Any) -> dict[tuple[str, int], Dataset]:
        now = time.monotonic()
        with self._lock:
            if now < self._expires:
                return self._table
        table = {(ds.aoi, ds.year): ds for ds in list_datasets(cur)}
        with self._lock:
            self._table, self._expires = table, now + self._ttl_s
        return table

    def get(self, cur: Any, aoi: str, year: int) -> Dataset | None:
        return self._current(cur).get((aoi, year))

    def fresh(self, aoi: str, year: int) -> Dataset | None:
        """The dataset when the cached table is fresh and holds it; None otherwise (the caller then
        takes the path that can read the table), so this never touches the database."""
        with self._lock:
            if time.monotonic() < self._expires:
                return self._table.get((aoi, year))
        return None

    def all(self, cur: Any) -> list[Dataset]:
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


def state_of(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "cbmflow", None)
    if state is None:
        raise ServiceUnavailableError("the API is not started (lifespan not run)")
    return state


@dataclass
class Call:
    """One authenticated request: its cursor, its user and its parameters."""

    cur: Any
    user: User
    request: Request
    state: AppState


@contextmanager
def authenticated(request: Request) -> Iterator[Call]:
    """Borrow a connection, authenticate the caller on it, and keep it for the request's queries."""
    state = state_of(request)
    with state.pool.cursor() as cur:
        user = state.auth.authenticate(cur, request.headers.get("authorization"))
        request.state.user = user
        yield Call(cur=cur, user=user, request=request, state=state)


FastPath = Callable[[Request], Awaitable[Response | None]]


def _route(path: str, handler: Callable[[Request], Response], fast: FastPath | None = None) -> Route:
    """The route of ``handler``; with ``fast``, an async endpoint that first tries ``fast`` on the
    event loop (see api/aiodb.py) and falls back to ``handler`` in the thread pool when ``fast``
    answers None (a request it does not cover) or loses its database connection."""

    def endpoint(request: Request) -> Response:
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
            response = await fast(request)
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
                return handler(request)
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

    chosen: Callable[[Request], Any] = endpoint if fast is None else fast_endpoint
    chosen.__name__ = handler.__name__
    chosen.__doc__ = handler.__doc__
    return Route(path, chosen, methods=["GET"])


async def _http_exception(request: Request, exc: Exception) -> Response:
    return response_for(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    return response_for(request, exc)


def create_app(dsn: str, settings: ApiSettings | None = None) -> Starlette:
    """A new API app on ``dsn``; the pool opens when the app starts and closes when it stops."""
    from api import chips, routes

    api_settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        size = max(1, _setting(api_settings, "pool_size", 10))
        pool = await run_in_threadpool(Pool, dsn, size, _setting(api_settings, "statement_timeout_s", 30))
        aio = AsyncPool(pool.dsn, size)
        app.state.cbmflow = AppState(
            settings=api_settings,
            pool=pool,
            aio=aio,
            auth=Authenticator(api_settings.auth_cache_s),
            polygon_limit=max(1, _setting(api_settings, "polygon_limit", 100)),
            chip_secret=chips.load_secret(api_settings),
            datasets=DatasetCache(float(getattr(api_settings, "dataset_cache_s", 5.0))),
        )
        log.info("api.started", pool_size=size)
        try:
            yield
        finally:
            app.state.cbmflow = None
            aio.close()
            await run_in_threadpool(pool.close)
            log.info("api.stopped")

    return Starlette(
        routes=[_route(path, handler, routes.FAST_PATHS.get(path)) for path, handler in routes.ROUTES],
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory``: every worker process builds its app from the environment."""
    return create_app(DbSettings().resolved_dsn(), ApiSettings())
