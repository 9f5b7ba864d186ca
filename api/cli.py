"""``cbmflow api`` and ``cbmflow users``.

Heavy imports (uvicorn, starlette, argon2, psycopg2) happen inside the commands so that
``cbmflow --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from cbmflow.db import Cursor

users_app = typer.Typer(help="API users and their dataset grants.", no_args_is_help=True)


def api(
    host: str | None = typer.Option(None, "--host", help="Bind address (default: CBMFLOW_API_HOST, else 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default: CBMFLOW_API_PORT, else 8080)."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Worker processes (default: CBMFLOW_API_WORKERS, else 1)."
    ),
    tls_cert: str | None = typer.Option(
        None, "--tls-cert", help="PEM certificate (chain): serve HTTPS (default: CBMFLOW_API_TLS_CERT)."
    ),
    tls_key: str | None = typer.Option(None, "--tls-key", help="PEM private key (default: CBMFLOW_API_TLS_KEY)."),
) -> None:
    """Serve the REST API (JRC /query/*, /api/v1) and the parcel explorer (/) until interrupted."""
    from api.server import serve
    from cbmflow.errors import ConfigError
    from cbmflow.settings import ApiSettings

    settings = ApiSettings()
    host, port, workers = host or settings.host, port or settings.port, workers or settings.workers
    cert, key = tls_cert or settings.tls_cert, tls_key or settings.tls_key
    try:
        settings.resolved_dsn()  # fail here, with a clear message, rather than in every worker
        scheme = "https" if cert else "http"
        typer.echo(f"cbmflow API at {scheme}://{host}:{port}/query/info ({workers} worker(s))")
        serve(host, port, workers, tls_cert=cert, tls_key=key)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _read_password() -> str:
    if sys.stdin.isatty():
        password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        return password
    # Scripted use: the first line of stdin, so the password never appears in argv or the environment.
    return sys.stdin.readline().rstrip("\r\n")


def _run(action: str, fn: Callable[[Any], object]) -> None:
    """Run a DB action in one transaction, turning user errors into a message and exit code 1."""
    from cbmflow import db
    from cbmflow.errors import CbmflowError
    from cbmflow.settings import DbSettings

    try:
        with db.transaction(DbSettings().resolved_dsn()) as cur:
            fn(cur)
    except CbmflowError as exc:
        typer.echo(f"{action}: {exc}", err=True)
        raise typer.Exit(1) from exc


def _warn_unknown(cur: Cursor, datasets: list[str]) -> None:
    from api.users import known_datasets

    missing = sorted(set(datasets) - known_datasets(cur))
    if missing:
        typer.echo(f"note: no dataset yet for {', '.join(missing)}; the grant applies once one is imported", err=True)


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="User name (A-Z a-z 0-9 _ . @ -)."),
    datasets: str = typer.Option("", "--datasets", help="Comma-separated AOIs the user may query, e.g. ms,xx."),
    admin: bool = typer.Option(False, "--admin", help="May query every dataset."),
) -> None:
    """Create a user; the password is prompted twice (a TTY) or read as one line from stdin."""
    from api import users
    from cbmflow.errors import CbmflowError

    try:
        aois = users.parse_datasets(datasets)
        users.check_name(name)
        password = users.check_password(_read_password())
    except CbmflowError as exc:
        typer.echo(f"users add: {exc}", err=True)
        raise typer.Exit(1) from exc

    def action(cur: Cursor) -> None:
        users.add_user(cur, name, password, aois, admin=admin)
        _warn_unknown(cur, aois)

    _run("users add", action)
    typer.echo(f"user {name} added" + (" (admin)" if admin else "") + (f", datasets {', '.join(aois)}" if aois else ""))


@users_app.command("passwd")
def users_passwd(name: str = typer.Argument(..., help="User name.")) -> None:
    """Set a new password (prompted twice on a TTY, else one line from stdin)."""
    from api import users
    from cbmflow.errors import CbmflowError

    try:
        password = users.check_password(_read_password())
    except CbmflowError as exc:
        typer.echo(f"users passwd: {exc}", err=True)
        raise typer.Exit(1) from exc
    _run("users passwd", lambda cur: users.set_password(cur, name, password))
    typer.echo(f"password of {name} changed")


@users_app.command("grant")
def users_grant(name: str = typer.Argument(...), aoi: str = typer.Argument(..., help="Dataset (AOI) name.")) -> None:
    """Allow a user to query one more dataset."""
    from api import users

    result: list[bool] = []

    def action(cur: Cursor) -> None:
        result.append(users.grant(cur, name, aoi))
        _warn_unknown(cur, [users.check_aoi(aoi)])

    _run("users grant", action)
    typer.echo(f"granted {aoi.strip().lower()} to {name}" if result[0] else f"{name} already had {aoi}")


@users_app.command("revoke")
def users_revoke(name: str = typer.Argument(...), aoi: str = typer.Argument(..., help="Dataset (AOI) name.")) -> None:
    """Withdraw a dataset from a user (effective on the next request)."""
    from api import users

    result: list[bool] = []
    _run("users revoke", lambda cur: result.append(users.revoke(cur, name, aoi)))
    typer.echo(f"revoked {aoi.strip().lower()} from {name}" if result[0] else f"{name} had no grant {aoi}")


@users_app.command("list")
def users_list() -> None:
    """Users, admin flag and granted datasets."""
    from rich.console import Console
    from rich.table import Table

    from api import users

    rows: list[users.UserInfo] = []
    _run("users list", lambda cur: rows.extend(users.list_users(cur)))
    table = Table("user", "admin", "datasets")
    for u in rows:
        table.add_row(u.name, "yes" if u.is_admin else "", ", ".join(u.datasets))
    Console().print(table)


@users_app.command("delete")
def users_delete(name: str = typer.Argument(...)) -> None:
    """Delete a user and their grants."""
    from api import users

    result: list[bool] = []
    _run("users delete", lambda cur: result.append(users.delete_user(cur, name)))
    if not result[0]:
        typer.echo(f"users delete: no user {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"user {name} deleted")


@users_app.command("token")
def users_token(
    name: str = typer.Argument(..., help="User name."),
    revoke: str = typer.Option("", "--revoke", help="Revoke the token with this id instead of creating one."),
    list_: bool = typer.Option(
        False, "--list", help="List the user's tokens (id, created, expires) instead of creating one."
    ),
    expires: str = typer.Option(
        "", "--expires", help="Validity of the new token: 30d, 12h, 2w, or never (default: CBMFLOW_API_TOKEN_TTL_DAYS)."
    ),
) -> None:
    """Create an API token (printed once; use as `Authorization: Bearer` or as the Basic password)."""
    from datetime import timedelta

    from api import users
    from cbmflow.errors import CbmflowError
    from cbmflow.settings import ApiSettings

    if revoke:
        done: list[bool] = []
        _run("users token", lambda cur: done.append(users.revoke_token(cur, name, revoke)))
        if not done[0]:
            typer.echo(f"users token: {name} has no token {revoke!r}", err=True)
            raise typer.Exit(1)
        typer.echo(f"token {revoke} of {name} revoked")
        return
    if list_:
        tokens: list[users.TokenInfo] = []
        _run("users token", lambda cur: tokens.extend(users.list_tokens(cur, name)))
        for t in tokens:
            state = "expired" if t.expired else ("never expires" if not t.expires_at else "expires")
            typer.echo(f"{t.id}  created {t.created_at}  {state} {t.expires_at}".rstrip())
        return
    try:
        if expires:
            ttl = users.parse_expires(expires)
        else:
            days = ApiSettings().token_ttl_days
            ttl = timedelta(days=days) if days > 0 else None
    except CbmflowError as exc:
        typer.echo(f"users token: {exc}", err=True)
        raise typer.Exit(1) from exc
    created: list[str] = []
    _run("users token", lambda cur: created.append(users.create_token(cur, name, ttl)))
    # Only the token on stdout, so `TOKEN=$(cbmflow users token alice)` works; the note goes to stderr.
    typer.echo(created[0])
    typer.echo(
        "store it now: only its hash is kept; "
        + (f"valid for {ttl}" if ttl is not None else "never expires")
        + "; revoke with --revoke "
        + created[0][5:17],
        err=True,
    )


@users_app.command("locks")
def users_locks(
    locked: bool = typer.Option(False, "--locked", help="Only the keys locked now."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
) -> None:
    """Failed logins that every API process shares: per (user, address) and per address."""
    import dataclasses
    import json

    from rich.console import Console
    from rich.table import Table

    from api import users

    rows: list[users.LoginRecord] = []
    _run("users locks", lambda cur: rows.extend(users.list_login_records(cur, locked_only=locked)))
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows]))
        return
    table = Table("user", "address", "distinct failures", "locked for", "last failure")
    for r in rows:
        locked_for = f"{r.locked_for_s:.0f} s" if r.locked_for_s else ""
        table.add_row(r.user or "(any)", r.address, str(r.failures), locked_for, r.last_at)
    Console().print(table)


@users_app.command("unlock")
def users_unlock(
    name: str = typer.Argument("", help="User name: their failed logins from every address."),
    address: str = typer.Option("", "--address", help="Client address: its failed logins (with NAME: that pair)."),
) -> None:
    """Forget failed logins in the shared record (a locked-out user at the helpdesk).

    Each API process also keeps its own short record, which runs out by itself within
    CBMFLOW_API_LOGIN_BACKOFF_MAX_S."""
    from api import users
    from cbmflow.errors import CbmflowError

    if not name and not address:
        typer.echo("users unlock: name a user, --address, or both", err=True)
        raise typer.Exit(2)
    try:
        if name:
            users.check_name(name)
    except CbmflowError as exc:
        typer.echo(f"users unlock: {exc}", err=True)
        raise typer.Exit(1) from exc
    removed: list[int] = []
    _run("users unlock", lambda cur: removed.append(users.clear_login_records(cur, name, address)))
    who = " from ".join(w for w in (name, address) if w)
    typer.echo(f"{who}: {removed[0]} failed-login record(s) removed")


def register(app: typer.Typer) -> None:
    app.command("api")(api)
    app.add_typer(users_app, name="users", help="API users and their dataset grants.")
