"""The error contract: one exception → HTTP status table, looked up along the exception's MRO.

JRC answered ``{}`` with 200 or an HTML 500; here every failure is JSON
``{"error": {"code": ..., "message": ...}}`` with the status of :data:`DEFAULT_STATUS_CODES`, and
bad user input is always a 4xx, never a 500 (titiler's ``core/errors.py`` is the model). A subclass
maps like its nearest listed base, so ``QueryCanceled`` (an ``OperationalError``) is a timeout and
not "database unavailable", and a new ``InvalidInputError`` subclass needs no entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.auth import AuthenticationError, InsecureTransportError, TooManyAttemptsError
from api.responses import ApiJSONResponse
from cbmflow.errors import CbmflowError, InvalidInputError, NotFoundError, PermissionDeniedError
from cbmflow.logging import get_logger
from cbmflow.store import StoreRefused, StoreUnavailable

log = get_logger("api")

WWW_AUTHENTICATE = 'Basic realm="cbmflow"'


class ServiceUnavailableError(CbmflowError):
    """The database cannot be reached or every pooled connection stayed busy (HTTP 503)."""


@dataclass(frozen=True)
class ErrorRule:
    """How one kind of exception is answered.

    ``message`` None shows the exception's own text: only our input/auth errors, whose text is
    written for the caller. Everything else gets a fixed message, so a driver's or store's text
    (table names, bucket names) never reaches a client; ``log_event`` records it server-side.
    """

    status: int
    code: str
    message: str | None = None
    log_event: str | None = None
    log_level: str = "error"


_DB_DOWN = ErrorRule(503, "unavailable", "the database is unavailable; retry later", "api.db_unavailable")

DEFAULT_STATUS_CODES: dict[type[BaseException], ErrorRule] = {
    InvalidInputError: ErrorRule(400, "invalid_input"),
    AuthenticationError: ErrorRule(401, "unauthorized"),
    PermissionDeniedError: ErrorRule(403, "forbidden"),
    InsecureTransportError: ErrorRule(403, "insecure_transport"),
    TooManyAttemptsError: ErrorRule(429, "too_many_requests"),
    NotFoundError: ErrorRule(404, "not_found"),
    # A value PostgreSQL refused (e.g. a coordinate PROJ cannot transform): the input's fault.
    psycopg2.DataError: ErrorRule(
        400, "invalid_input", "a parameter value was rejected by the database", "api.data_error", "info"
    ),
    psycopg2.errors.QueryCanceled: ErrorRule(
        503, "timeout", "the query took too long; narrow it down", "api.query_timeout", "warning"
    ),
    ServiceUnavailableError: _DB_DOWN,
    psycopg2.OperationalError: _DB_DOWN,
    psycopg2.InterfaceError: _DB_DOWN,
    StoreUnavailable: ErrorRule(
        503, "unavailable", "the object store is unavailable; retry later", "api.store_unavailable"
    ),
    # Access denied or no such bucket is the operator's configuration, not the caller's input, and
    # retrying will not help: a plain 500, logged. (The chip routes turn a refused *object* into
    # "scene left out" or 404 themselves; only what escapes them lands here.)
    StoreRefused: ErrorRule(500, "internal_error", "internal server error", "api.store_refused"),
}

HTTP_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    414: "uri_too_long",
}

_UNEXPECTED = ErrorRule(500, "internal_error", "internal server error")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": WWW_AUTHENTICATE} if status == 401 else None
    return ApiJSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def rule_for(exc: BaseException, table: dict[type[BaseException], ErrorRule] | None = None) -> ErrorRule | None:
    """The rule of the nearest class in ``exc``'s MRO that the table lists; None if none does."""
    table = DEFAULT_STATUS_CODES if table is None else table
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


def _summary(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def response_for(request: Request, exc: BaseException) -> JSONResponse:
    """Map any exception to the JSON error contract; unexpected ones are logged and kept generic."""
    rule = rule_for(exc)
    if rule is None and isinstance(exc, HTTPException):
        resp = error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp
    if rule is None:
        log.error("api.internal_error", path=request.url.path, exc_info=exc)
        rule = _UNEXPECTED
    elif rule.log_event is not None:
        getattr(log, rule.log_level)(rule.log_event, path=request.url.path, error=_summary(exc))
    resp = error_response(rule.status, rule.code, rule.message or str(exc) or rule.code)
    if isinstance(exc, TooManyAttemptsError):
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return resp


async def _handle(request: Request, exc: Exception) -> Response:
    return response_for(request, exc)


def add_exception_handlers(app: Starlette) -> None:
    """Answer what escapes a route (and Starlette's own 404/405) with the error contract."""
    app.add_exception_handler(HTTPException, _handle)
    app.add_exception_handler(Exception, _handle)
