"""HTTP Basic authentication on argon2id hashes, API tokens, and per-dataset grants.

Basic auth is kept because the JRC ``cbm`` client only speaks Basic. API tokens
(``cbmflow users token NAME``) are accepted as ``Authorization: Bearer <token>`` and also as the
Basic password of their user, so the unmodified JRC client can use a token instead of a password
(a token is revocable on its own and never equals a password a human reuses elsewhere). argon2id is deliberately
slow, so a verified (user, password) pair is remembered for ``auth_cache_s``; the cache key is an
HMAC-SHA256 of the pair under a per-process random key, so neither the password nor an offline
guessable digest of it is ever held in memory. The user row and its grants are still read on
every request (one indexed query), so deleting a user, changing a password or revoking a grant
takes effect at once instead of after the cache expiry.

Unknown users and malformed names still cost one argon2 verification against a dummy hash, so
response time does not reveal whether a user exists.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import psycopg2
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cbmflow.db import Cursor
from cbmflow.errors import CbmflowError, PermissionDeniedError
from cbmflow.logging import get_logger
from cbmflow.vocab import AOI_NAME_PATTERN

log = get_logger("api.auth")

# Mirrors the CHECK constraint on users.name; anything else can never match a row, and rejecting it
# before the query keeps NUL and control characters away from the database driver.
USER_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# Mirrors the CHECK constraint on aois.name: what a grant, and the ``aoi`` parameter, may name.
AOI_PATTERN = AOI_NAME_PATTERN
AOI_RE = re.compile(AOI_PATTERN)
_MAX_PASSWORD_CHARS = 1024
# cbmf_<12 hex id>_<43 url-safe characters = 256 random bits>
TOKEN_RE = re.compile(r"^cbmf_([a-f0-9]{12})_([A-Za-z0-9_-]{43})$")
TOKEN_PREFIX = "cbmf_"

# The caller's row and grants; also the first CTE of the one-statement parcelTimeSeries query.
USER_ROW_SQL = (
    "SELECT u.name, u.password_hash, u.is_admin,"
    " coalesce(array_agg(g.aoi) FILTER (WHERE g.aoi IS NOT NULL), '{}'::text[]) AS grants"
    " FROM users u LEFT JOIN user_grants g ON g.user_name = u.name"
    " WHERE u.name = %(user)s GROUP BY u.name, u.password_hash, u.is_admin"
)


class AuthenticationError(CbmflowError):
    """Missing, malformed or wrong credentials (HTTP 401)."""


@dataclass(frozen=True)
class User:
    """The authenticated caller of one request; lives in ``request.state.user``."""

    name: str
    is_admin: bool
    grants: frozenset[str]

    def can_see(self, aoi: str) -> bool:
        return self.is_admin or aoi in self.grants


@cache
def _hasher() -> PasswordHasher:
    # argon2-cffi's defaults are argon2id with the RFC 9106 "low memory" profile.
    return PasswordHasher()


@cache
def _dummy_hash() -> str:
    return _hasher().hash(secrets.token_urlsafe(24))


def hash_password(password: str) -> str:
    """argon2id hash (PHC string, salt and parameters included) for ``users.password_hash``."""
    return _hasher().hash(password)


def verify(password_hash: str, password: str) -> bool:
    """True when ``password`` matches; a corrupt or foreign hash counts as a mismatch, never an error."""
    try:
        return bool(_hasher().verify(password_hash, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def parse_basic(header: str | None) -> tuple[str, str]:
    """(name, password) from an ``Authorization: Basic ...`` header (RFC 7617: UTF-8, else Latin-1)."""
    if not header:
        raise AuthenticationError("credentials required")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        raise AuthenticationError("HTTP Basic credentials required")
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthenticationError("malformed Basic credentials") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    name, sep, password = text.partition(":")
    if not sep:
        raise AuthenticationError("malformed Basic credentials")
    return name, password


def new_token() -> tuple[str, str, str]:
    """(token id, the token to hand out once, SHA-256 hex of its secret to store)."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secret}", token_digest(secret)


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _user_from_row(row: Any) -> User:
    return User(name=str(row[0]), is_admin=bool(row[2]), grants=frozenset(str(g) for g in row[3]))


@dataclass
class _Entry:
    password_hash: str
    expires_at: float


class Authenticator:
    """Verifies Basic credentials against ``users`` with a bounded, time-limited cache of successes."""

    def __init__(self, cache_s: float, max_entries: int = 10_000) -> None:
        self._cache_s = max(0.0, float(cache_s))
        self._max_entries = max_entries
        self._secret = secrets.token_bytes(32)
        self._entries: dict[bytes, _Entry] = {}
        self._lock = threading.Lock()
        self._inflight: dict[bytes, tuple[threading.Lock, int]] = {}
        # Each argon2 verification holds 64 MiB for ~0.1 s of a core: more at once than there are
        # cores only queues them, and an unbounded number is a memory blow-up on demand.
        self._verify_slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))

    def _key(self, name: str, password: str) -> bytes:
        material = name.encode("utf-8", "surrogatepass") + b"\x00" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, material, hashlib.sha256).digest()

    def _cached(self, key: bytes, password_hash: str) -> bool:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.expires_at <= now:
                del self._entries[key]
                return False
        # A changed hash (password reset) invalidates the entry even before it expires.
        return hmac.compare_digest(entry.password_hash.encode(), password_hash.encode())

    def _remember(self, key: bytes, password_hash: str) -> None:
        if self._cache_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= self._max_entries:
                for k in [k for k, e in self._entries.items() if e.expires_at <= now]:
                    del self._entries[k]
                if len(self._entries) >= self._max_entries:
                    self._entries.clear()
            self._entries[key] = _Entry(password_hash, now + self._cache_s)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def authenticate(self, cur: Cursor, header: str | None, before_verify: Callable[[], None] | None = None) -> User:
        """The caller of this request, or AuthenticationError; ``cur`` is a psycopg2 cursor.

        ``before_verify`` runs just before a password is verified (never for a token or a
        recently verified password): the shared throttle's check, which costs a round trip that
        only a verification, at ~0.1 s of argon2, can afford on every request."""
        scheme, _, rest = (header or "").strip().partition(" ")
        if scheme.lower() == "bearer":
            return self._token_user(cur, rest.strip(), None)
        name, password = parse_basic(header)
        if password.startswith(TOKEN_PREFIX) and TOKEN_RE.match(password):
            return self._token_user(cur, password, name)
        row = None
        if USER_NAME_RE.match(name) and len(password) <= _MAX_PASSWORD_CHARS:
            cur.execute(USER_ROW_SQL, {"user": name})
            row = cur.fetchone()
        return self.check_password(name, password, row, before_verify)

    def check_password(
        self, name: str, password: str, row: Any, before_verify: Callable[[], None] | None = None
    ) -> User:
        """The user of ``row`` (a USER_ROW_SQL row, None when there is no such user) if the password fits.

        Split from :meth:`authenticate` so a route may fetch the row inside a larger statement.
        """
        if row is None:
            if before_verify is not None:
                before_verify()
            # Same work as a real check, so timing does not tell unknown users apart.
            with self._verify_slots:
                verify(_dummy_hash(), password[:_MAX_PASSWORD_CHARS])
            log.info("auth.failed", user=name[:64], reason="unknown user")
            raise AuthenticationError("invalid credentials")
        password_hash = str(row[1])
        key = self._key(name, password)
        if not self._cached(key, password_hash):
            with self._single_flight(key):
                # A client opening many connections at once (a notebook's thread pool, wrk -c32)
                # sends the same credentials on all of them before the first is verified; they
                # wait for that one verification instead of each running argon2.
                if not self._cached(key, password_hash):
                    if before_verify is not None:
                        before_verify()
                    with self._verify_slots:
                        ok = verify(password_hash, password)
                    if not ok:
                        log.info("auth.failed", user=name, reason="wrong password")
                        raise AuthenticationError("invalid credentials")
                    self._remember(key, password_hash)
        return _user_from_row(row)

    def cached_user(self, name: str, password: str, row: Any) -> User | None:
        """The user of ``row`` when this (name, password) was verified recently; None when a
        verification would be needed (unknown user, cache miss, changed hash), which costs an
        argon2 run and so belongs off the event loop (:meth:`check_password` in a thread)."""
        if row is None or not self._cached(self._key(name, password), str(row[1])):
            return None
        return _user_from_row(row)

    @contextmanager
    def _single_flight(self, key: bytes) -> Iterator[None]:
        with self._lock:
            lock, waiting = self._inflight.get(key, (threading.Lock(), 0))
            self._inflight[key] = (lock, waiting + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, waiting = self._inflight[key]
                if waiting == 1:
                    del self._inflight[key]
                else:
                    self._inflight[key] = (lock, waiting - 1)

    def _token_user(self, cur: Cursor, token: str, basic_name: str | None) -> User:
        """The owner of an API token; with Basic, the user name must be the token's owner."""
        m = TOKEN_RE.match(token)
        if m is None:
            raise AuthenticationError("invalid credentials")
        token_id, secret = m.groups()
        cur.execute(
            "SELECT user_name, secret_sha256, coalesce(expires_at <= now(), false) FROM api_tokens WHERE id = %s",
            (token_id,),
        )
        found = cur.fetchone()
        if found is None or not hmac.compare_digest(str(found[1]).encode(), token_digest(secret).encode()):
            log.info("auth.failed", reason="unknown token or wrong secret", token_id=token_id)
            raise AuthenticationError("invalid credentials")
        if found[2]:
            # Checked after the secret, so an expired token's id alone tells a guesser nothing.
            log.info("auth.failed", reason="token expired", token_id=token_id)
            raise AuthenticationError("token expired")
        owner = str(found[0])
        if basic_name is not None and basic_name != owner:
            log.info("auth.failed", user=basic_name[:64], reason="token of another user")
            raise AuthenticationError("invalid credentials")
        cur.execute(USER_ROW_SQL, {"user": owner})
        row = cur.fetchone()
        if row is None:
            raise AuthenticationError("invalid credentials")
        return _user_from_row(row)


def password_credentials(header: str | None) -> tuple[str, str] | None:
    """(name, password) when ``header`` is Basic with a possible user name and a password (not a
    token); None for anything else, which then takes the general :meth:`Authenticator.authenticate`."""
    scheme, _, _ = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, password = parse_basic(header)
    except AuthenticationError:
        return None
    if password.startswith(TOKEN_PREFIX) or not USER_NAME_RE.match(name) or len(password) > _MAX_PASSWORD_CHARS:
        return None
    return name, password


def authorize(user: User, aoi: str) -> None:
    """Raise PermissionDeniedError unless ``user`` was granted ``aoi`` (or is an admin)."""
    if not user.can_see(aoi):
        log.info("auth.denied", user=user.name, aoi=aoi)
        raise PermissionDeniedError(f"user {user.name!r} is not granted dataset {aoi!r}")


class TooManyAttemptsError(CbmflowError):
    """Too many failed logins for this user or from this address (HTTP 429 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InsecureTransportError(CbmflowError):
    """Credentials sent over plain HTTP from a non-loopback client (HTTP 403)."""


def is_local_peer(host: str | None) -> bool:
    """True for a loopback address, and for a peer that is no IP address at all (a Unix socket,
    an in-process test client): only a network peer can be eavesdropped on the way."""
    import ipaddress

    if not host:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return True


def basic_name(header: str | None) -> str:
    """The user name of a Basic header ('' for anything else): the throttle's per-user key."""
    try:
        name, _ = parse_basic(header)
    except AuthenticationError:
        return ""
    return name[:64]


def _credentials_digest(secret: bytes, name: str, credentials: str) -> bytes:
    """What tells two failed credentials apart without holding either: a keyed hash, truncated."""
    material = name.encode("utf-8", "surrogatepass") + b"\0" + credentials.encode("utf-8", "surrogatepass")
    return hmac.new(secret, material, hashlib.sha256).digest()[:16]


@dataclass(frozen=True)
class LoginAllowance:
    """The throttle's numbers, normalised once: this process's record and the shared one are
    built from the same instance, so both lock after the same failures for the same time."""

    base_s: float
    max_s: float
    free: int
    address_free: int

    @classmethod
    def of(
        cls, base_s: float, max_s: float, free_failures: int, address_free_failures: int | None = None
    ) -> LoginAllowance:
        base = max(0.0, base_s)
        free = max(0, free_failures)
        address_free = 5 * free if address_free_failures is None else max(0, address_free_failures)
        return cls(base, max(base, max_s), free, address_free)


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0
    seen: set[bytes] | None = None


class LoginThrottle:
    """Exponential backoff after failed logins, per (user, address) and per address, in memory.

    Why these keys: a lock on the user name alone lets anyone who knows a name lock its owner out
    (an attacker hammering ``alice`` from one address would starve ``alice`` everywhere); keyed on
    (user, address) the attacker only locks himself, while the per-address key (a larger
    allowance) slows one address spraying many names. A distributed guesser gets the allowance per
    address, each guess still paying a full argon2 verification.

    Only distinct failures count: a client retrying the same stale password (a notebook loop)
    is a configuration error, not a guess, and must not lock anyone out; it still gets 401s.

    State lives in each API process (per worker), answers without a database round trip and is
    forgotten on a restart; :class:`SharedLoginThrottle` is the record all processes share.
    """

    def __init__(
        self, base_s: float, max_s: float, free_failures: int, address_free_failures: int | None = None
    ) -> None:
        self.allowance = LoginAllowance.of(base_s, max_s, free_failures, address_free_failures)
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], _Failures] = {}
        self._secret = secrets.token_bytes(32)
        self._max_entries = 100_000

    def _keys(self, name: str, address: str) -> list[tuple[tuple[str, ...], int]]:
        keys: list[tuple[tuple[str, ...], int]] = [(("addr", address), self.allowance.address_free)]
        if name:
            keys.insert(0, (("user", name, address), self.allowance.free))
        return keys

    def _expired(self, entry: _Failures, now: float) -> bool:
        # Forgotten after a quiet spell twice the longest lock.
        return now - entry.last > 2 * self.allowance.max_s and now >= entry.locked_until

    def check(self, name: str, address: str, now: float | None = None) -> None:
        """Raise TooManyAttemptsError while (name, address) or address is locked."""
        if self.allowance.base_s <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            wait = 0.0
            for key, _ in self._keys(name, address):
                entry = self._entries.get(key)
                if entry is not None and entry.locked_until > now:
                    wait = max(wait, entry.locked_until - now)
        if wait > 0:
            raise TooManyAttemptsError("too many failed logins; retry later", retry_after_s=wait)

    def failed(self, name: str, address: str, secret: str, now: float | None = None) -> None:
        """Count a failure (once per distinct credentials) and lock when past the allowance."""
        if self.allowance.base_s <= 0:
            return
        now = time.monotonic() if now is None else now
        digest = _credentials_digest(self._secret, name, secret)
        with self._lock:
            if len(self._entries) >= self._max_entries:
                for k in [k for k, e in self._entries.items() if self._expired(e, now)]:
                    del self._entries[k]
            for key, free in self._keys(name, address):
                entry = self._entries.get(key)
                if entry is None or self._expired(entry, now):
                    entry = self._entries[key] = _Failures(seen=set())
                assert entry.seen is not None
                entry.last = now
                if digest in entry.seen:
                    continue
                if len(entry.seen) < 64:
                    entry.seen.add(digest)
                entry.count += 1
                if entry.count > free:
                    a = self.allowance
                    lock_s = min(a.max_s, a.base_s * 2 ** min(30, entry.count - free - 1))
                    entry.locked_until = max(entry.locked_until, now + lock_s)
                    log.warning("auth.throttled", key=key[0], user=name or None, address=address, lock_s=lock_s)

    def succeeded(self, name: str, address: str) -> bool:
        """A success clears the (user, address) record; the address's own record stays. True when
        there was one to clear."""
        with self._lock:
            return self._entries.pop(("user", name, address), None) is not None


class SharedLoginThrottle:
    """The failed-login record every API process and host shares, in the database (sql/015).

    Why besides :class:`LoginThrottle`: with ``CBMFLOW_API_WORKERS=4`` and two hosts behind a load
    balancer a guesser's allowance was eight times the setting, one per process. Same keys, same
    allowances and backoff; what differs is where the record lives and when it is consulted: only
    before a password is verified (a recently verified password, a token or a session costs no
    round trip), and written only after a verification failed. The API role writes nothing but
    through the three SECURITY DEFINER functions of sql/015.

    Distinct failures are told apart by a keyed hash under ``secret`` (the host's chip secret), so
    a stale password repeated through two hosts counts once on each. Where the record cannot be
    read or written (a database not yet migrated to sql/015) the in-memory throttle still holds and
    ``auth.shared_throttle_unavailable`` is logged; a login is never refused for it.
    """

    def __init__(self, secret: bytes, allowance: LoginAllowance) -> None:
        self._secret = hmac.new(secret, b"cbmflow login throttle", hashlib.sha256).digest()
        self.allowance = allowance

    @property
    def enabled(self) -> bool:
        return self.allowance.base_s > 0

    def check(self, cur: Cursor, name: str, address: str) -> None:
        """Raise TooManyAttemptsError while (name, address) or address is locked by any process."""
        if not self.enabled:
            return
        try:
            cur.execute("SELECT login_wait_s(%s, %s)", (name, address))
            row = cur.fetchone()
        except psycopg2.Error as exc:
            self._unavailable(cur, exc)
            return
        wait = float(row[0]) if row is not None and row[0] is not None else 0.0
        if wait > 0:
            raise TooManyAttemptsError("too many failed logins; retry later", retry_after_s=wait)

    def failed(self, cur: Cursor, name: str, address: str, credentials: str) -> None:
        """Count a verified failure; the API's read-only session opens one read-write transaction
        for the function call (the role can write nothing else in it)."""
        if not self.enabled:
            return
        digest = psycopg2.Binary(_credentials_digest(self._secret, name, credentials))
        a = self.allowance
        self._write(
            cur,
            "SELECT login_failed(%s, %s, %s, %s, %s, %s, %s)",
            (name, address, digest, a.free, a.address_free, a.base_s, a.max_s),
        )

    def succeeded(self, cur: Cursor, name: str, address: str) -> None:
        """A verified password clears its (user, address) record; the address's own stays."""
        if self.enabled:
            self._write(cur, "SELECT login_succeeded(%s, %s)", (name, address))

    def _write(self, cur: Cursor, call: str, args: tuple[Any, ...]) -> None:
        try:
            cur.execute(f"START TRANSACTION READ WRITE; {call}; COMMIT", args)
        except psycopg2.Error as exc:
            self._unavailable(cur, exc)

    @staticmethod
    def _unavailable(cur: Cursor, exc: psycopg2.Error) -> None:
        # An error inside the explicit transaction leaves the session in it, aborted: end it, or
        # the pooled connection refuses every later statement.
        if not cur.connection.closed:
            try:
                cur.execute("ROLLBACK")
            except psycopg2.Error:
                cur.connection.close()  # the pool drops a closed connection
        log.warning("auth.shared_throttle_unavailable", error=str(exc).strip().splitlines()[0][:200])


class VerificationGuard:
    """``before_verify`` for :meth:`Authenticator.authenticate`: the shared check, remembering
    whether a verification was about to run (only then is its outcome worth a write)."""

    def __init__(self, throttle: SharedLoginThrottle, cur: Cursor, name: str, address: str) -> None:
        self._throttle, self._cur, self._name, self._address = throttle, cur, name, address
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        self._throttle.check(self._cur, self._name, self._address)
