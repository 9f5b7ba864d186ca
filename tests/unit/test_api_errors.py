"""The exception → HTTP status table, without a server: statuses, codes and bodies clients rely on,
subclasses mapped by MRO, and no driver or store text leaking into a response."""

from __future__ import annotations

import json

import psycopg2
import psycopg2.errors
import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from api.auth import AuthenticationError
from api.errors import DEFAULT_STATUS_CODES, ServiceUnavailableError, response_for, rule_for
from cbmflow.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from cbmflow.store import StoreRefused, StoreUnavailable

DB_DOWN = "the database is unavailable; retry later"


def _request() -> Request:
    return Request({"type": "http", "method": "GET", "path": "/query/x", "headers": [], "query_string": b""})


def _answer(exc: BaseException) -> tuple[int, dict[str, str], dict[str, str]]:
    resp = response_for(_request(), exc)
    body = json.loads(bytes(resp.body))
    assert set(body) == {"error"}
    return resp.status_code, body["error"], dict(resp.headers)


class _OddInput(InvalidInputError):
    """A subclass nobody listed: it must answer like its base."""


@pytest.mark.parametrize(
    ("exc", "status", "code", "message"),
    [
        (InvalidInputError("parameter 'year' is required"), 400, "invalid_input", "parameter 'year' is required"),
        (_OddInput("odd"), 400, "invalid_input", "odd"),
        (AuthenticationError("wrong credentials"), 401, "unauthorized", "wrong credentials"),
        (PermissionDeniedError("not granted"), 403, "forbidden", "not granted"),
        (NotFoundError(""), 404, "not_found", "not_found"),
        (
            psycopg2.errors.QueryCanceled("canceling statement due to statement timeout"),
            503,
            "timeout",
            "the query took too long; narrow it down",
        ),
        (
            psycopg2.errors.InvalidParameterValue("transform: latitude or longitude exceeded limits"),
            400,
            "invalid_input",
            "a parameter value was rejected by the database",
        ),
        (psycopg2.OperationalError("server closed"), 503, "unavailable", DB_DOWN),
        (
            psycopg2.InterfaceError("connection already closed"),
            503,
            "unavailable",
            "the database is unavailable; retry later",
        ),
        (
            ServiceUnavailableError("no database connection free"),
            503,
            "unavailable",
            "the database is unavailable; retry later",
        ),
        (StoreUnavailable("s3://bucket/key: 503"), 503, "unavailable", "the object store is unavailable; retry later"),
        (StoreRefused("s3://secret-bucket/key: AccessDenied"), 500, "internal_error", "internal server error"),
        (RuntimeError("relation ms.hists_2024 does not exist"), 500, "internal_error", "internal server error"),
    ],
)
def test_status_table(exc: BaseException, status: int, code: str, message: str) -> None:
    got_status, error, headers = _answer(exc)
    assert (got_status, error["code"], error["message"]) == (status, code, message)
    assert ("www-authenticate" in headers) == (status == 401)


def test_lookup_follows_the_mro() -> None:
    # QueryCanceled is an OperationalError: the nearer entry (timeout) wins over "unavailable".
    assert issubclass(psycopg2.errors.QueryCanceled, psycopg2.OperationalError)
    assert rule_for(psycopg2.errors.QueryCanceled()) is DEFAULT_STATUS_CODES[psycopg2.errors.QueryCanceled]
    assert rule_for(psycopg2.errors.InvalidParameterValue()) is DEFAULT_STATUS_CODES[psycopg2.DataError]
    assert rule_for(KeyError("x")) is None


def test_starlette_http_errors_keep_their_status() -> None:
    status, error, _ = _answer(HTTPException(405, "Method Not Allowed"))
    assert (status, error) == (405, {"code": "method_not_allowed", "message": "Method Not Allowed"})
    status, error, _ = _answer(HTTPException(418, "teapot"))
    assert (status, error["code"]) == (418, "http_error")
