"""A real STAC API for watcher tests: stac-fastapi-pgstac on the test PostgreSQL, loaded through
pgstac's own SQL functions, behind a loopback proxy that can answer a burst of 429s.

The proxy exists only for the rate-limit case (stac-fastapi never throttles); every other answer
is the real server's, byte for byte.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
import requests


def pgstac_migrate(dsn: str) -> None:
    """Install the pgstac schema with pypgstac itself (a missing pypgstac fails loudly)."""
    subprocess.run(
        [str(Path(sys.executable).parent / "pypgstac"), "migrate", "--dsn", dsn],
        check=True,
        capture_output=True,
        timeout=180,
    )


def declare_datetime_queryables(dsn: str, names: tuple[str, ...]) -> None:
    """Declare catalogue timestamps as date-time queryables, as CDSE's ``/queryables`` does for
    ``published``: without this pgstac compares them as text and a CQL2 timestamp filter fails."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET search_path TO pgstac, public")
        for name in names:
            cur.execute(
                "INSERT INTO pgstac.queryables (name, definition, property_wrapper, property_index_type)"
                " VALUES (%s, %s::jsonb, 'to_tstz', 'BTREE')",
                (name, json.dumps({"type": "string", "format": "date-time", "title": name})),
            )
    conn.close()


def upsert_collection(dsn: str, coll: dict[str, Any]) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pgstac.upsert_collection(%s::jsonb)", (json.dumps(coll),))
    conn.close()


def upsert_items(dsn: str, items: list[dict[str, Any]]) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pgstac.upsert_items(%s::jsonb)", (json.dumps(items),))
    conn.close()


def delete_item(dsn: str, item_id: str, collection: str) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET search_path TO pgstac, public")
        cur.execute("SELECT pgstac.delete_item(%s, %s)", (item_id, collection))
    conn.close()


@dataclass
class Throttle:
    """Answer the next ``remaining`` requests with 429 and ``Retry-After``; count what came."""

    remaining: int = 0
    only_method: str = ""
    """Throttle only this method ("POST": the searches), or every request when empty."""
    retry_after_s: float = 0.2
    served_429: int = 0
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _proxy_handler(upstream: str, throttle: Throttle) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            with throttle.lock:
                throttle.requests.append(f"{self.command} {self.path} {(body or b'').decode(errors='replace')}")
                refuse = throttle.remaining > 0 and throttle.only_method in ("", self.command)
                if refuse:
                    throttle.remaining -= 1
                    throttle.served_429 += 1
            if refuse:
                payload = b'{"code":"TooManyRequests"}'
                self.send_response(429)
                self.send_header("Retry-After", str(throttle.retry_after_s))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            # The client's Host header goes along, so the links the server writes name the proxy.
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "accept-encoding")}
            r = requests.request(self.command, upstream + self.path, data=body, headers=headers, timeout=30)
            content = r.content
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = _forward
        do_POST = _forward

    return Handler


@dataclass
class StacServer:
    url: str
    dsn: str
    throttle: Throttle
    log_path: Path


@contextmanager
def run_stac_api(
    pg_host: str, pg_port: int, user: str, password: str, database: str, port: int, proxy_port: int, log_path: Path
) -> Iterator[StacServer]:
    """Serve ``database`` (pgstac installed) on ``port``, behind the throttling proxy on ``proxy_port``;
    the server's log goes to ``log_path`` (a pipe nobody reads would fill and stall it)."""
    env = dict(
        os.environ,
        PGHOST=pg_host,
        PGPORT=str(pg_port),
        PGUSER=user,
        PGPASSWORD=password,
        PGDATABASE=database,
        ENABLED_EXTENSIONS="query,sort,fields,filter,pagination,collection_search",
        DB_MIN_CONN_SIZE="1",
        DB_MAX_CONN_SIZE="4",
        STAC_FASTAPI_TITLE="cbmflow test catalogue",
        STAC_FASTAPI_DESCRIPTION="items shaped like CDSE and earth-search ones",
        STAC_FASTAPI_LANDING_ID="cbmflow-test",
        STAC_FASTAPI_VERSION="test",
    )
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "stac_fastapi.pgstac.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    upstream = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stac-fastapi-pgstac exited: {log_path.read_text()[-3000:]}")
            try:
                if requests.get(upstream + "/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("stac-fastapi-pgstac did not answer within 60 s")
            time.sleep(0.2)
        throttle = Throttle()
        proxy = http.server.ThreadingHTTPServer(("127.0.0.1", proxy_port), _proxy_handler(upstream, throttle))
        t = threading.Thread(target=proxy.serve_forever, daemon=True)
        t.start()
        try:
            yield StacServer(url=f"http://127.0.0.1:{proxy_port}", dsn="", throttle=throttle, log_path=log_path)
        finally:
            proxy.shutdown()
            proxy.server_close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
