"""API users and their dataset grants, in PostgreSQL (JRC kept them in a JSON file).

Functions take an open cursor so that callers (the CLI, the demo, tests) choose the transaction.
Passwords are stored only as argon2id hashes, API tokens only as SHA-256 digests of their secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from api.auth import AOI_RE, USER_NAME_RE, hash_password, new_token
from cbmflow.db import Cursor
from cbmflow.errors import InvalidInputError, NotFoundError

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024


@dataclass(frozen=True)
class UserInfo:
    name: str
    is_admin: bool
    datasets: list[str]


def check_name(name: str) -> str:
    if not USER_NAME_RE.match(name):
        raise InvalidInputError(f"invalid user name {name!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    return name


def check_aoi(aoi: str) -> str:
    aoi = aoi.strip().lower()
    if not AOI_RE.match(aoi):
        raise InvalidInputError(f"invalid dataset name {aoi!r}: a lower-case letter, then letters, digits or _")
    return aoi


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidInputError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    return password


def parse_datasets(text: str) -> list[str]:
    """``ms,xx`` → ['ms', 'xx'] (validated, de-duplicated, order kept)."""
    out: list[str] = []
    for part in text.split(","):
        if part.strip():
            aoi = check_aoi(part)
            if aoi not in out:
                out.append(aoi)
    return out


def _exists(cur: Cursor, name: str) -> bool:
    cur.execute("SELECT 1 FROM users WHERE name = %s", (name,))
    return cur.fetchone() is not None


def _grant_all(cur: Cursor, name: str, datasets: Iterable[str]) -> None:
    for aoi in datasets:
        cur.execute(
            "INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (name, check_aoi(aoi)),
        )


def add_user(cur: Cursor, name: str, password: str, datasets: Iterable[str] = (), admin: bool = False) -> None:
    """Create a user; refuses to overwrite an existing one (use ``upsert_user`` for that)."""
    check_name(name)
    check_password(password)
    if _exists(cur, name):
        raise InvalidInputError(f"user {name!r} already exists")
    cur.execute(
        "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, %s)",
        (name, hash_password(password), admin),
    )
    _grant_all(cur, name, datasets)


def upsert_user(cur: Cursor, name: str, password: str, datasets: Iterable[str] = (), admin: bool = False) -> None:
    """Create or reset a user (password and admin flag); grants are added, never removed.

    The demo calls this on every run with the same password, so it must be idempotent.
    """
    check_name(name)
    check_password(password)
    cur.execute(
        "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET password_hash = EXCLUDED.password_hash, is_admin = EXCLUDED.is_admin",
        (name, hash_password(password), admin),
    )
    _grant_all(cur, name, datasets)


def set_password(cur: Cursor, name: str, password: str) -> None:
    check_password(password)
    cur.execute("UPDATE users SET password_hash = %s WHERE name = %s", (hash_password(password), check_name(name)))
    if cur.rowcount == 0:
        raise NotFoundError(f"no user {name!r}")


def grant(cur: Cursor, name: str, aoi: str) -> bool:
    """True when the grant is new."""
    if not _exists(cur, check_name(name)):
        raise NotFoundError(f"no user {name!r}")
    cur.execute(
        "INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (name, check_aoi(aoi)),
    )
    return bool(cur.rowcount)


def revoke(cur: Cursor, name: str, aoi: str) -> bool:
    """True when a grant was removed."""
    if not _exists(cur, check_name(name)):
        raise NotFoundError(f"no user {name!r}")
    cur.execute("DELETE FROM user_grants WHERE user_name = %s AND aoi = %s", (name, check_aoi(aoi)))
    return bool(cur.rowcount)


def delete_user(cur: Cursor, name: str) -> bool:
    """True when the user existed; their grants go with them (ON DELETE CASCADE)."""
    cur.execute("DELETE FROM users WHERE name = %s", (check_name(name),))
    return bool(cur.rowcount)


def list_users(cur: Cursor) -> list[UserInfo]:
    cur.execute(
        "SELECT u.name, u.is_admin,"
        " coalesce(array_agg(g.aoi ORDER BY g.aoi) FILTER (WHERE g.aoi IS NOT NULL), '{}'::text[])"
        " FROM users u LEFT JOIN user_grants g ON g.user_name = u.name"
        " GROUP BY u.name, u.is_admin ORDER BY u.name"
    )
    return [UserInfo(str(n), bool(a), [str(x) for x in g]) for n, a, g in cur.fetchall()]


def known_datasets(cur: Cursor) -> set[str]:
    """AOIs that have at least one dataset, so the CLI can warn about grants to nothing (yet)."""
    cur.execute("SELECT DISTINCT aoi FROM datasets")
    return {str(r[0]) for r in cur.fetchall()}


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user: str
    created_at: str
    expires_at: str
    """ISO 8601, or '' for a token that never expires."""
    expired: bool


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


def parse_expires(text: str) -> timedelta | None:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45`` (days) → a duration; ``never`` or ``0`` → None."""
    if text.strip().lower() in ("never", "0", "none"):
        return None
    m = _DURATION_RE.match(text.lower())
    if m is None or float(m.group(1)) <= 0:
        raise InvalidInputError(f"invalid expiry {text!r}: a number with s, m, h, d or w (e.g. 30d), or never")
    return timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])


def create_token(cur: Cursor, name: str, expires_in: timedelta | None = None) -> str:
    """A new API token for ``name``, valid for ``expires_in`` (None: until revoked); the token
    itself is returned once and never stored."""
    if not _exists(cur, check_name(name)):
        raise NotFoundError(f"no user {name!r}")
    token_id, token, digest = new_token()
    cur.execute(
        "INSERT INTO api_tokens (id, user_name, secret_sha256, expires_at) VALUES (%s, %s, %s, now() + %s::interval)",
        (token_id, name, digest, expires_in),
    )
    return token


def revoke_token(cur: Cursor, name: str, token_id: str) -> bool:
    """True when the user had this token (by its id, the 12 hex digits after ``cbmf_``)."""
    cur.execute("DELETE FROM api_tokens WHERE user_name = %s AND id = %s", (check_name(name), token_id))
    return bool(cur.rowcount)


def list_tokens(cur: Cursor, name: str) -> list[TokenInfo]:
    cur.execute(
        "SELECT id, user_name, to_char(created_at, 'YYYY-MM-DD\"T\"HH24:MI:SSOF'),"
        " coalesce(to_char(expires_at, 'YYYY-MM-DD\"T\"HH24:MI:SSOF'), ''), coalesce(expires_at <= now(), false)"
        " FROM api_tokens WHERE user_name = %s ORDER BY created_at, id",
        (check_name(name),),
    )
    return [TokenInfo(str(i), str(u), str(c), str(e), bool(x)) for i, u, c, e, x in cur.fetchall()]


@dataclass(frozen=True)
class LoginRecord:
    """One key of the shared failed-login record (sql/015): a (user, address) or an address."""

    kind: str
    user: str
    address: str
    failures: int
    locked_for_s: float
    """Seconds the key stays locked; 0 when it is not locked now."""
    last_at: str


def list_login_records(cur: Cursor, locked_only: bool = False) -> list[LoginRecord]:
    """The shared record's keys, locked ones first: who is being guessed at, and from where."""
    cur.execute(
        "SELECT kind, user_name, address, failures,"
        " CASE WHEN locked_until > clock_timestamp()"
        " THEN extract(epoch FROM locked_until - clock_timestamp())::float8 ELSE 0 END,"
        " to_char(last_at, 'YYYY-MM-DD\"T\"HH24:MI:SSOF')"
        " FROM login_failures WHERE NOT %s OR locked_until > clock_timestamp()"
        " ORDER BY locked_until DESC, last_at DESC",
        (locked_only,),
    )
    return [LoginRecord(str(k), str(u), str(a), int(f), float(w), str(t)) for k, u, a, f, w, t in cur.fetchall()]


def clear_login_records(cur: Cursor, name: str = "", address: str = "") -> int:
    """Forget failed logins of a user (every address), of an address (its own key and the users'
    keys from it), or of that user from that address; returns the keys removed."""
    if not name and not address:
        raise InvalidInputError("name a user, an address or both")
    cur.execute(
        "DELETE FROM login_failures WHERE (%(user)s = '' OR (kind = 'user' AND user_name = %(user)s))"
        " AND (%(address)s = '' OR address = %(address)s)",
        {"user": check_name(name) if name else "", "address": address.strip()},
    )
    return int(cur.rowcount)
