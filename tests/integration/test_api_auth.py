"""Authentication hardening on a real PostgreSQL: token expiry, the failed-login throttle (and
that it does not starve a valid user), plain-HTTP Basic refused off loopback, TLS served by
`cbmflow api --tls-cert/--tls-key`, tenant-facing failure reasons without server paths, and the
plot route under concurrent requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import requests
import typer
from starlette.testclient import TestClient
from test_api import ALICE, ROOT, Seed, _db_value, _error, _json, _seed
from typer.testing import CliRunner

from api import users
from api.app import create_app
from api.cli import register
from cbmflow import db
from cbmflow.dev.api_process import free_port
from cbmflow.settings import ApiSettings

BASE = "/api/v1/datasets/ms/2024"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def seed(pg_dsn: str) -> Seed:
    return _seed(pg_dsn)


@pytest.fixture
def api_dsn(seed: Seed) -> str:
    return db.role_dsn(seed.dsn, "api")


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_tokens_expire_and_are_listed_with_their_expiry(
    seed: Seed, api_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CBMFLOW_DB_DSN", seed.dsn)
    monkeypatch.setenv("CBMFLOW_API_TOKEN_TTL_DAYS", "7")
    made = CliRunner().invoke(_cli(), ["users", "token", "alice", "--expires", "30d"])
    assert made.exit_code == 0, made.output
    month = made.stdout.strip()
    default = CliRunner().invoke(_cli(), ["users", "token", "alice"]).stdout.strip()
    forever = CliRunner().invoke(_cli(), ["users", "token", "alice", "--expires", "never"]).stdout.strip()
    days = {
        tid: _db_value(
            seed.dsn, "SELECT extract(epoch FROM expires_at - created_at) / 86400 FROM api_tokens WHERE id = %s", (tid,)
        )
        for tid in (month[5:17], default[5:17], forever[5:17])
    }
    assert days[month[5:17]] == pytest.approx(30, abs=1e-3)
    assert days[default[5:17]] == pytest.approx(7, abs=1e-3)  # CBMFLOW_API_TOKEN_TTL_DAYS
    assert days[forever[5:17]] is None
    bad = CliRunner().invoke(_cli(), ["users", "token", "alice", "--expires", "soon"])
    assert bad.exit_code == 1 and "invalid expiry" in bad.output

    with TestClient(create_app(api_dsn, ApiSettings(login_backoff_base_s=0))) as client:
        for token in (month, default, forever):
            assert client.get(f"{BASE}/parcel?pid=P-1", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with db.transaction(seed.dsn) as cur:
            cur.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = %s", (month[5:17],))
        resp = client.get(f"{BASE}/parcel?pid=P-1", headers={"Authorization": f"Bearer {month}"})
        assert _error(resp, 401, "unauthorized")["message"] == "token expired"
        _error(client.get(f"{BASE}/parcel?pid=P-1", auth=("alice", month)), 401, "unauthorized")  # as Basic too
        assert client.get(f"{BASE}/parcel?pid=P-1", headers={"Authorization": f"Bearer {forever}"}).status_code == 200

    listed = CliRunner().invoke(_cli(), ["users", "token", "alice", "--list"])
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "expired" in lines[month[5:17]] and "never expires" in lines[forever[5:17]]
    assert "expires 20" in lines[default[5:17]]
    assert CliRunner().invoke(_cli(), ["users", "token", "alice", "--revoke", forever[5:17]]).exit_code == 0
    with db.transaction(seed.dsn) as cur:
        tokens = users.list_tokens(cur, "alice")
    assert [t.id for t in tokens] == [month[5:17], default[5:17]] and tokens[0].expired and not tokens[1].expired
    with db.transaction(seed.dsn) as cur:
        soon = users.create_token(cur, "alice", timedelta(seconds=1))
    time.sleep(1.2)
    with TestClient(create_app(api_dsn)) as client:
        _error(client.get(f"{BASE}/parcel?pid=P-1", headers={"Authorization": f"Bearer {soon}"}), 401, "unauthorized")


def test_failed_logins_are_throttled_without_starving_the_valid_user(api_dsn: str) -> None:
    settings = ApiSettings(allow_plain_basic=True, login_backoff_base_s=1.0, login_free_failures=3)
    url = f"{BASE}/parcel?pid=P-1"
    app = create_app(api_dsn, settings)
    with TestClient(app, client=("203.0.113.66", 40000)) as attacker:
        alice_home = TestClient(app, client=("198.51.100.7", 40001))  # shares the started app's state
        for n in range(4):  # the allowance, and the failure that starts the lock
            _error(attacker.get(url, auth=("alice", f"guess-{n}")), 401, "unauthorized")
        locked = attacker.get(url, auth=("alice", "guess-4"))
        _error(locked, 429, "too_many_requests")
        assert 1 <= int(locked.headers["retry-after"]) <= 2
        # Even the right password is refused from the locked address, before any verification...
        _error(attacker.get(url, auth=ALICE), 429, "too_many_requests")
        # ...while alice from her own address is not locked out by the attacker using her name.
        assert alice_home.get(url, auth=ALICE).status_code == 200
        # The backoff doubles: after the lock ends, the next failure locks for about twice as long.
        time.sleep(int(locked.headers["retry-after"]) + 0.1)
        _error(attacker.get(url, auth=("alice", "guess-5")), 401, "unauthorized")
        again = attacker.get(url, auth=("alice", "guess-6"))
        _error(again, 429, "too_many_requests")
        assert 2 <= int(again.headers["retry-after"]) <= 3

        # A client repeating the same stale password is not guessing: 401s, never a lock.
        stale = TestClient(app, client=("198.51.100.8", 40002))
        for _ in range(10):
            _error(stale.get(url, auth=("alice", "last-years-password")), 401, "unauthorized")
        assert stale.get(url, auth=ALICE).status_code == 200

        # One address spraying many names is slowed by the per-address allowance (5 x 3).
        spray = TestClient(app, client=("203.0.113.99", 40003))
        answers = [spray.get(url, auth=(f"user{n}", "password-1")).status_code for n in range(17)]
        assert answers[:15] == [401] * 15 and answers[16] == 429, answers
        _error(spray.get(url, auth=ROOT), 429, "too_many_requests")
        assert alice_home.get(url, auth=ALICE).status_code == 200


def test_the_failed_login_record_is_shared_by_every_api_process(
    seed: Seed, api_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two app instances stand for two uvicorn workers (or hosts): each has its own in-memory
    throttle, so only the database record (sql/015) can make their allowance one."""
    settings = ApiSettings(allow_plain_basic=True, login_backoff_base_s=30.0, login_free_failures=3)
    url = f"{BASE}/parcel?pid=P-1"
    first, second = create_app(api_dsn, settings), create_app(api_dsn, settings)
    guesser = ("203.0.113.70", 40000)
    with TestClient(first, client=guesser) as a, TestClient(second, client=guesser) as b:
        for n, client in enumerate((a, b, a, b)):  # the allowance, spread over both processes
            _error(client.get(url, auth=("alice", f"guess-{n}")), 401, "unauthorized")
        # Each process alone has seen two failures, under its allowance: only the shared record locks.
        locked = a.get(url, auth=("alice", "guess-4"))
        _error(locked, 429, "too_many_requests")
        _error(b.get(url, auth=("alice", "guess-5")), 429, "too_many_requests")
        assert 29 <= int(locked.headers["retry-after"]) <= 30
        # The API role wrote the rows only through sql/015's functions; they hold no credentials.
        rows = _db_value(
            seed.dsn, "SELECT array[count(*), max(failures)] FROM login_failures WHERE address = '203.0.113.70'"
        )
        assert rows == [2, 4], rows
        seen = _db_value(seed.dsn, "SELECT seen FROM login_failures WHERE kind = 'user' AND address = '203.0.113.70'")
        assert len(seen) == 4 and all(len(bytes(d)) == 16 for d in seen)
        assert not any(b"guess" in bytes(d) for d in seen)
        # alice at home, through either process, is not locked out by the guesser using her name.
        for app in (first, second):
            assert TestClient(app, client=("198.51.100.7", 1)).get(url, auth=ALICE).status_code == 200

        # One stale password repeated through both processes counts once: never a lock.
        for app in (first, second) * 4:
            stale = TestClient(app, client=("198.51.100.8", 2))
            _error(stale.get(url, auth=("alice", "last-years-password")), 401, "unauthorized")
        assert (
            _db_value(seed.dsn, "SELECT failures FROM login_failures WHERE kind = 'user' AND address = '198.51.100.8'")
            == 1
        )
        # A verified login through the other process clears that (user, address) record.
        assert TestClient(second, client=("198.51.100.8", 2)).get(url, auth=ALICE).status_code == 200
        assert (
            _db_value(seed.dsn, "SELECT count(*) FROM login_failures WHERE kind = 'user' AND address = '198.51.100.8'")
            == 0
        )

    # A restarted API (a fresh process, empty memory) still refuses the locked guesser.
    with TestClient(create_app(api_dsn, settings), client=guesser) as restarted:
        _error(restarted.get(url, auth=("alice", "guess-6")), 429, "too_many_requests")

    # The helpdesk sees the lock and lifts it: `cbmflow users locks` and `users unlock`.
    monkeypatch.setenv("CBMFLOW_DB_DSN", seed.dsn)
    shown = CliRunner().invoke(_cli(), ["users", "locks", "--locked", "--json"])
    assert shown.exit_code == 0, shown.output
    (lock,) = json.loads(shown.stdout)
    assert (lock["kind"], lock["user"], lock["address"], lock["failures"]) == ("user", "alice", "203.0.113.70", 4)
    assert 0 < lock["locked_for_s"] <= 30
    table = CliRunner().invoke(_cli(), ["users", "locks"])
    assert "203.0.113.70" in table.stdout and "(any)" in table.stdout  # the address's own key, not locked
    lifted = CliRunner().invoke(_cli(), ["users", "unlock", "alice", "--address", "203.0.113.70"])
    assert lifted.exit_code == 0 and "1 failed-login record(s) removed" in lifted.stdout, lifted.output
    assert json.loads(CliRunner().invoke(_cli(), ["users", "locks", "--locked", "--json"]).stdout) == []
    with TestClient(create_app(api_dsn, settings), client=guesser) as after:
        _error(after.get(url, auth=("alice", "guess-7")), 401, "unauthorized")  # a wrong password again, not a lock
    refused = CliRunner().invoke(_cli(), ["users", "unlock"])
    assert refused.exit_code == 2 and "name a user" in refused.output


def test_an_api_on_a_database_without_the_shared_record_still_answers(seed: Seed, api_dsn: str) -> None:
    """A database not migrated to sql/015 (or its functions dropped): logins are neither refused nor
    broken by it, and the pooled connection is not left in an aborted transaction."""
    with db.transaction(seed.dsn) as cur:
        cur.execute(
            "DROP FUNCTION login_failed(text, text, bytea, integer, integer, double precision, double precision)"
        )
        cur.execute("DROP FUNCTION login_wait_s(text, text)")
        cur.execute("DROP FUNCTION login_succeeded(text, text)")
    settings = ApiSettings(allow_plain_basic=True, login_backoff_base_s=1.0, login_free_failures=3, pool_size=1)
    url = f"{BASE}/parcel?pid=P-1"
    with TestClient(create_app(api_dsn, settings), client=("198.51.100.9", 1)) as client:
        for n in range(3):  # the same pooled connection serves each failure and then alice
            _error(client.get(url, auth=("alice", f"wrong-{n}")), 401, "unauthorized")
            assert client.get(url, auth=ALICE).status_code == 200
        for n in range(3, 7):  # the in-memory throttle still holds: the fourth failure locks
            client.get(url, auth=("alice", f"wrong-{n}"))
        _error(client.get(url, auth=("alice", "wrong-9")), 429, "too_many_requests")


def test_behind_a_trusted_proxy_the_forwarded_client_is_throttled_not_the_proxy(api_dsn: str) -> None:
    """Behind a reverse proxy every connection comes from the proxy: without
    CBMFLOW_API_TRUSTED_PROXIES, one client spraying names would lock the proxy's address, i.e.
    everyone. With it, the throttle and the plain-HTTP check see the client the proxy names."""
    settings = ApiSettings(login_backoff_base_s=30.0, login_free_failures=3, trusted_proxies="127.0.0.1, 10.9.9.9/8")
    url = f"{BASE}/parcel?pid=P-1"

    def forwarded(client: str, proto: str = "https") -> dict[str, str]:
        return {"X-Forwarded-For": client, "X-Forwarded-Proto": proto}

    app = create_app(api_dsn, settings)
    with TestClient(app, client=("127.0.0.1", 40000)) as proxy:
        answers = [
            proxy.get(url, auth=(f"user{n}", "password-1"), headers=forwarded("203.0.113.66")).status_code
            for n in range(17)
        ]
        assert answers[:16] == [401] * 16 and answers[16] == 429, answers
        _error(proxy.get(url, auth=ALICE, headers=forwarded("203.0.113.66")), 429, "too_many_requests")
        # Everyone else behind the same proxy, and behind a second one in a trusted network, is served.
        assert proxy.get(url, auth=ALICE, headers=forwarded("198.51.100.7")).status_code == 200
        other = TestClient(app, client=("10.1.2.3", 40001))
        assert other.get(url, auth=ALICE, headers=forwarded("198.51.100.8")).status_code == 200
        # The proxy's own hop is plain HTTP; X-Forwarded-Proto tells what the client used.
        _error(proxy.get(url, auth=ALICE, headers=forwarded("198.51.100.7", "http")), 403, "insecure_transport")

        # A client that is not a trusted proxy cannot choose the address it is throttled by.
        direct = TestClient(app, base_url="https://testserver", client=("192.0.2.50", 40002))
        answers = [
            direct.get(url, auth=(f"user{n}", "password-2"), headers={"X-Forwarded-For": f"198.18.0.{n}"}).status_code
            for n in range(17)
        ]
        assert answers[:16] == [401] * 16 and answers[16] == 429, answers


def test_basic_over_plain_http_is_refused_off_loopback(api_dsn: str) -> None:
    url = f"{BASE}/parcel?pid=P-1"
    app = create_app(api_dsn, ApiSettings())
    with TestClient(app, client=("127.0.0.1", 40000)) as local:
        assert local.get(url, auth=ALICE).status_code == 200
        assert TestClient(app, client=("::1", 40000)).get(url, auth=ALICE).status_code == 200
        remote = TestClient(app, client=("192.0.2.10", 40000))
        body = _error(remote.get(url, auth=ALICE), 403, "insecure_transport")
        assert "HTTPS" in body["message"] and "CBMFLOW_API_ALLOW_PLAIN_BASIC" in body["message"]
        _error(remote.get(url), 401, "unauthorized")  # no credentials sent: nothing exposed, the usual 401
        _error(remote.get("/query/info", auth=ALICE), 403, "insecure_transport")  # the JRC routes as well
        secure = TestClient(app, base_url="https://testserver", client=("192.0.2.10", 40000))
        assert secure.get(url, auth=ALICE).status_code == 200
    with TestClient(create_app(api_dsn, ApiSettings(allow_plain_basic=True)), client=("192.0.2.10", 1)) as allowed:
        assert allowed.get(url, auth=ALICE).status_code == 200


def test_cbmflow_api_serves_tls(api_dsn: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    port = free_port()
    env = {**os.environ, "CBMFLOW_API_DSN": api_dsn, "CBMFLOW_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    env.pop("CBMFLOW_DB_DSN", None)  # the API needs only its own role's DSN
    command = [sys.executable, "-m", "cbmflow", "api", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--tls-cert", str(cert), "--tls-key", str(key)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = requests.get(f"https://127.0.0.1:{port}/healthz", verify=str(cert), timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the TLS server did not start"
                time.sleep(0.2)
        assert _json(resp) == {"status": "ok", "database": "ok"}
        assert requests.get(f"https://127.0.0.1:{port}{BASE}/parcel?pid=P-1", auth=ALICE, verify=str(cert)).ok
        with pytest.raises(requests.ConnectionError):  # no plain HTTP on the TLS port
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    half = subprocess.run(
        [*command, "--tls-cert", str(cert)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert half.returncode == 1 and "both a certificate and its key" in half.stderr


def test_tenants_see_failure_reasons_without_paths_or_dsns(seed: Seed, api_dsn: str) -> None:
    reason = (
        "gave up after 6 deliveries (delivery limit 5): transient: OperationalError: connection to server at"
        ' "10.20.30.40", port 5432 failed; dsn postgresql://cbm:hunter2@db.internal:5432/cbm;'
        " FileNotFoundError: [Errno 2] No such file or directory: '/srv/eodata/Sentinel-2/S2A_X.SAFE/B04.jp2'"
    )
    with db.transaction(seed.dsn) as cur:
        cur.execute("UPDATE scenes SET status = 'failed', reason = %s WHERE id = %s", (reason, seed.scenes["may"]))
    with TestClient(create_app(api_dsn)) as client:
        mine = {s["id"]: s for s in _json(client.get("/api/v1/scenes", auth=ALICE))["scenes"]}
        full = {s["id"]: s for s in _json(client.get("/api/v1/scenes", auth=ROOT))["scenes"]}
    tenant, admin = mine[seed.scenes["may"]], full[seed.scenes["may"]]
    assert admin["reason"] == reason  # admins see everything
    shown = tenant["reason"]
    for secret in ("/srv", "eodata", "hunter2", "db.internal", "10.20.30.40", "postgresql://", "B04.jp2"):
        assert secret not in shown, (secret, shown)
    # the class of the failure and what happened stay readable; the product is its own field
    assert shown.startswith("gave up after 6 deliveries (delivery limit 5): transient: OperationalError")
    assert "FileNotFoundError: [Errno 2] No such file or directory" in shown
    assert tenant["product_id"] == "id-may" and tenant["status"] == "failed"
    assert all(s["reason"] is None for sid, s in mine.items() if sid != seed.scenes["may"])


def test_plot_route_renders_concurrently(api_dsn: str) -> None:
    with TestClient(create_app(api_dsn)) as client:

        def one(i: int) -> bytes:
            resp = client.get(f"{BASE}/plot.png", params={"pid": "P-1", "max_cloud": 1}, auth=ALICE)
            assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
            return resp.content

        with ThreadPoolExecutor(max_workers=8) as pool:
            images = list(pool.map(one, range(16)))
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert len({len(img) for img in images}) == 1, "the same plot, byte-identical size, whatever the interleaving"
