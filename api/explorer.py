"""The parcel explorer: a static page served at ``/``, and the short-lived session tokens it logs
in with.

The page is plain HTML, CSS and JavaScript in ``api/static/`` with MapLibre GL and uPlot
vendored from the npm registry (``api/static/vendor/<package>-<version>/``, licences beside
them), so nothing is built or fetched at run time and the page works where no outside network is.

**Sessions.** The API never writes to the database (its role is SELECT-only, docs/security.md),
so a browser login cannot create an ``api_tokens`` row. ``POST /api/v1/auth/token`` with Basic
credentials instead answers a *signed* token, ``cbms_<payload>.<mac>``: the user name, an expiry
(``CBMFLOW_API_SESSION_TTL_S``) and a fingerprint of the user's stored password hash, MACed with a key
derived from the chip-signing secret (shared by the workers of a host). Each request still reads
the user row and grants (as with every credential), so deleting the user, revoking a grant or
changing the password ends a session at once; expiry ends it within the hour. The page keeps it in
``sessionStorage`` (gone with the tab), never in a cookie, so no request carries it implicitly and
cross-site request forgery has nothing to ride on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import USER_ROW_SQL, AuthenticationError, Authenticator, User
from api.errors import response_for
from api.infra import Endpoint, authenticated
from api.openapi import STR, json_content
from api.params import Param, Params
from api.responses import ApiJSONResponse
from cbmflow.errors import InvalidInputError, NotFoundError
from cbmflow.logging import get_logger

log = get_logger("api")

STATIC_DIR = Path(__file__).with_name("static")
SESSION_PREFIX = "cbms_"
SESSION_RE = re.compile(r"^cbms_([A-Za-z0-9_-]{16,600})\.([A-Za-z0-9_-]{43})$")
TOKEN_PATH = "/api/v1/auth/token"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; worker-src 'self'; connect-src 'self';"
    " img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; object-src 'none';"
    " base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
"""Only the API's own origin: the vendored MapLibre build is its CSP variant (a worker script
file instead of a blob), chips arrive as ``data:`` PNGs, exports are ``blob:`` downloads.
``unsafe-inline`` styles only, for the libraries' computed element styles."""


# --- session tokens -------------------------------------------------------------------------------


def session_key(chip_secret: bytes) -> bytes:
    """A key of its own for sessions, derived from the host's chip secret (no second secret file)."""
    return hmac.new(chip_secret, b"cbmflow explorer session v1", hashlib.sha256).digest()


def password_fingerprint(password_hash: str) -> str:
    """Changes whenever the stored hash does (a new password, a new salt): it ties a session to
    the password it was opened with, and reveals nothing about the hash."""
    return hashlib.sha256(b"cbmflow session\0" + password_hash.encode("utf-8")).hexdigest()[:24]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_session(key: bytes, user: str, fingerprint: str, expires: int) -> str:
    body = _b64(json.dumps([user, expires, fingerprint], separators=(",", ":")).encode("utf-8"))
    mac = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return f"{SESSION_PREFIX}{body}.{_b64(mac)}"


def open_session(key: bytes, token: str, now: float | None = None) -> tuple[str, str, int]:
    """(user, password fingerprint, expiry) of a genuine, unexpired token; else AuthenticationError."""
    m = SESSION_RE.match(token)
    if m is None:
        raise AuthenticationError("invalid credentials")
    body, mac = m.groups()
    expected = _b64(hmac.new(key, body.encode("ascii"), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, mac):
        log.info("auth.failed", reason="forged or foreign session token")
        raise AuthenticationError("invalid credentials")
    user, expires, fingerprint = json.loads(_unb64(body))
    if int(expires) <= (time.time() if now is None else now):
        raise AuthenticationError("session expired; log in again")
    return str(user), str(fingerprint), int(expires)


class SessionAuthenticator(Authenticator):
    """:class:`~api.auth.Authenticator` that also takes ``Authorization: Bearer cbms_...``."""

    def __init__(self, cache_s: float, key: bytes) -> None:
        super().__init__(cache_s)
        self._session_key = key

    def authenticate(self, cur: Any, header: str | None, before_verify: Callable[[], None] | None = None) -> User:
        scheme, _, rest = (header or "").strip().partition(" ")
        token = rest.strip()
        if scheme.lower() == "bearer" and token.startswith(SESSION_PREFIX):
            return self.session_user(cur, token)
        return super().authenticate(cur, header, before_verify)

    def session_user(self, cur: Any, token: str) -> User:
        name, fingerprint, _ = open_session(self._session_key, token)
        cur.execute(USER_ROW_SQL, {"user": name})
        row = cur.fetchone()
        if row is None or not hmac.compare_digest(password_fingerprint(str(row[1])), fingerprint):
            log.info("auth.failed", user=name[:64], reason="session of a deleted user or an old password")
            raise AuthenticationError("session ended; log in again")
        return User(name=str(row[0]), is_admin=bool(row[2]), grants=frozenset(str(g) for g in row[3]))

    def expiry(self, token: str) -> int:
        """When a session token (already accepted by :meth:`authenticate`) ends, epoch seconds."""
        return open_session(self._session_key, token)[2]

    def issue(self, user: str, password_hash: str, ttl_s: int) -> tuple[str, int]:
        expires = int(time.time()) + max(60, ttl_s)
        return sign_session(self._session_key, user, password_fingerprint(password_hash), expires), expires


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _issue_token(request: Request) -> Response:
    """A session token for Basic credentials (a password, or a ``cbmf_`` API token as password)."""
    scheme, _, _ = (request.headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        # A session must not extend itself for ever: a new one needs the password again.
        raise InvalidInputError("log in with HTTP Basic credentials (user name and password) to get a session token")
    with authenticated(request) as call:
        auth = call.state.auth
        if not isinstance(auth, SessionAuthenticator):
            raise NotFoundError("sessions are not enabled on this server")
        call.cur.execute(USER_ROW_SQL, {"user": call.user.name})
        row = call.cur.fetchone()
        if row is None:
            raise AuthenticationError("invalid credentials")
        ttl_s = call.state.settings.session_ttl_s
        token, expires = auth.issue(call.user.name, str(row[1]), ttl_s)
        log.info("auth.session_issued", user=call.user.name, expires_at=_iso(expires))
        return ApiJSONResponse(
            {
                "token": token,
                "token_type": "Bearer",
                "expires_in": expires - int(time.time()),
                "expires_at": _iso(expires),
                "user": call.user.name,
                "is_admin": call.user.is_admin,
            },
            headers={"Cache-Control": "no-store"},
        )


async def issue_token(request: Request) -> Response:
    try:
        return await run_in_threadpool(_issue_token, request)
    except Exception as exc:
        response = response_for(request, exc)
        # The page's login form answers a wrong password itself; a Basic challenge here would make
        # the browser open its own password dialog over the page.
        if "www-authenticate" in response.headers:
            del response.headers["www-authenticate"]
        return response


def whoami(request: Request, p: Params) -> Response:
    """The caller, as the page shows it; with a session token, when the session ends."""
    with authenticated(request) as call:
        header = (request.headers.get("authorization") or "").strip()
        expires = None
        if header.lower().startswith("bearer cbms_"):
            auth = call.state.auth
            assert isinstance(auth, SessionAuthenticator)
            expires = _iso(auth.expiry(header.split(" ", 1)[1].strip()))
        return ApiJSONResponse(
            {
                "user": call.user.name,
                "is_admin": call.user.is_admin,
                "grants": sorted(call.user.grants),
                "expires_at": expires,
            },
            headers={"Cache-Control": "no-store"},
        )


# --- the page and its files -----------------------------------------------------------------------

STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png"}


@cache
def static_files() -> dict[str, Path]:
    """Every servable file by its (unique) base name: our own files and the vendored dist files.

    A fixed table, so a request names a file and can never name a path (no traversal to check).
    """
    table: dict[str, Path] = {}
    for path in sorted(STATIC_DIR.rglob("*")):
        if path.is_file() and path.suffix in STATIC_TYPES:
            if path.name in table:
                raise RuntimeError(f"two static files named {path.name}: {table[path.name]} and {path}")
            table[path.name] = path
    return table


@cache
def _static(name: str) -> tuple[bytes, str]:
    body = static_files()[name].read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _conditional(request: Request, body: bytes, etag: str, media_type: str, headers: dict[str, str]) -> Response:
    if request.headers.get("if-none-match", "") == etag:
        return Response(status_code=304, headers={"ETag": etag, **headers})
    return Response(body, media_type=media_type, headers={"ETag": etag, **headers})


def page(request: Request, p: Params) -> Response:
    """The explorer page (no credentials: it logs in itself)."""
    body, etag = _static("index.html")
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return _conditional(request, body, etag, "text/html; charset=utf-8", headers)


def static(request: Request, p: Params) -> Response:
    """One file of the page (scripts, styles), revalidated by ETag."""
    name = p.required_text("name")
    if name not in static_files():
        raise NotFoundError("no such file")
    body, etag = _static(name)
    media = STATIC_TYPES[static_files()[name].suffix]
    if media.startswith("text/"):
        media += "; charset=utf-8"
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    return _conditional(request, body, etag, media, headers)


NAME = Param("name", where="path", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", hint="a file name")


def routes() -> list[Endpoint]:
    """The page, its files and the session's ``GET`` (the ``POST`` that opens one is :func:`token_route`)."""
    files = {media: {"schema": STR} for media in sorted(set(STATIC_TYPES.values()) - {"image/png"})}
    session = {
        "type": "object",
        "properties": {
            "user": STR,
            "is_admin": {"type": "boolean"},
            "grants": {"type": "array", "items": STR},
            "expires_at": {"type": "string", "nullable": True},
        },
    }
    return [
        Endpoint(
            "/",
            page,
            "the parcel explorer (HTML page)",
            {"text/html": {"schema": STR}},
            auth=False,
            found=False,
            tag="explorer",
        ),
        Endpoint("/static/{name}", static, "a file of the explorer page", files, (NAME,), auth=False, tag="explorer"),
        Endpoint(
            TOKEN_PATH,
            whoami,
            "the caller and, for a session token, its expiry (POST with Basic credentials opens a session)",
            json_content(session),
            found=False,
            tag="explorer",
        ),
    ]


def token_route() -> Route:
    """``POST /api/v1/auth/token``: Basic credentials in, a session token out (JSON)."""
    return Route(TOKEN_PATH, issue_token, methods=["POST"])
