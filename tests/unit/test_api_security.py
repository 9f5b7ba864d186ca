"""The pieces of API hardening that need no server: the login throttle's arithmetic, reason and
log redaction, token expiry parsing, the loopback test and pyplot staying unimported."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import timedelta

import pytest
import structlog
from pydantic import ValidationError

from api.auth import LoginThrottle, TooManyAttemptsError, is_local_peer
from api.users import parse_expires
from api.v1 import tenant_reason
from cbmflow.errors import InvalidInputError
from cbmflow.logging import configure, get_logger, redact_secrets
from cbmflow.settings import ApiSettings


def _locked_for(throttle: LoginThrottle, name: str, address: str, now: float) -> float:
    try:
        throttle.check(name, address, now=now)
    except TooManyAttemptsError as exc:
        return exc.retry_after_s
    return 0.0


def test_throttle_backs_off_exponentially_per_user_and_address() -> None:
    t = LoginThrottle(base_s=1.0, max_s=8.0, free_failures=2)
    now = 1000.0
    for n in range(2):
        t.failed("alice", "a", f"pw{n}", now=now)
        assert _locked_for(t, "alice", "a", now) == 0.0
    expected = [1.0, 2.0, 4.0, 8.0, 8.0]  # doubling from the first failure past the allowance, capped
    for n, lock in enumerate(expected, start=2):
        t.failed("alice", "a", f"pw{n}", now=now)
        assert _locked_for(t, "alice", "a", now) == pytest.approx(lock)
        assert _locked_for(t, "alice", "b", now) == 0.0, "another address of the same user is not locked"
        assert _locked_for(t, "bob", "a", now) == 0.0, "the address itself is below its own allowance"
        now += lock
    t.succeeded("alice", "a")
    assert _locked_for(t, "alice", "a", now) == 0.0


def test_throttle_counts_distinct_credentials_and_limits_an_address_spraying_names() -> None:
    t = LoginThrottle(base_s=1.0, max_s=60.0, free_failures=2)
    for _ in range(50):
        t.failed("alice", "a", "same-stale-password", now=0.0)
    assert _locked_for(t, "alice", "a", 0.0) == 0.0
    for n in range(10):  # the address allowance is 5 x 2
        t.failed(f"user{n}", "z", "pw", now=0.0)
    assert _locked_for(t, "nobody-yet", "z", 0.0) == 0.0
    t.failed("user10", "z", "pw", now=0.0)
    assert _locked_for(t, "nobody-yet", "z", 0.0) == pytest.approx(1.0)
    assert _locked_for(t, "", "z", 0.0) == pytest.approx(1.0), "tokens from that address wait as well"
    # forgotten after a quiet spell of twice the longest lock
    t.failed("user11", "z", "pw", now=200.0)
    assert _locked_for(t, "x", "z", 200.0) == 0.0
    off = LoginThrottle(base_s=0.0, max_s=0.0, free_failures=0)
    off.failed("alice", "a", "pw", now=0.0)
    assert _locked_for(off, "alice", "a", 0.0) == 0.0


def test_loopback_and_non_network_peers() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "", None, "testclient"):
        assert is_local_peer(host), host
    for host in ("10.0.0.1", "192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"):
        assert not is_local_peer(host), host


def test_parse_expires() -> None:
    assert parse_expires("30d") == timedelta(days=30)
    assert parse_expires("12h") == timedelta(hours=12)
    assert parse_expires("2w") == timedelta(weeks=2)
    assert parse_expires("90m") == timedelta(minutes=90)
    assert parse_expires("45") == timedelta(days=45)
    assert parse_expires("never") is None and parse_expires("0") is None
    for bad in ("", "soon", "-1d", "3y", "1d2h"):
        with pytest.raises(InvalidInputError):
            parse_expires(bad)


@pytest.mark.parametrize(
    ("reason", "hidden", "kept"),
    [
        (
            "permanent: FileNotFoundError: [Errno 2] No such file or directory: '/mnt/eodata/S2/X.SAFE/a.jp2'",
            ["/mnt", "eodata", "a.jp2"],
            "permanent: FileNotFoundError: [Errno 2] No such file or directory:",
        ),
        (
            'transient: OperationalError: connection to server at "db-7.internal" (10.0.0.5), port 5432 failed',
            ["db-7.internal", "10.0.0.5"],
            "transient: OperationalError: connection to server at",
        ),
        (
            "store: StoreUnavailable: s3://bucket/prefix/p.tif via https://minio:9000 host=db password=pw",
            ["bucket", "minio", "password=pw", "host=db"],
            "store: StoreUnavailable:",
        ),
        ("no parcels in this scene", [], "no parcels in this scene"),
        ("decode: ValueError: at 10:30:00 the band B04 was empty", [], "at 10:30:00 the band B04 was empty"),
    ],
)
def test_tenant_reason_hides_paths_urls_and_hosts(reason: str, hidden: list[str], kept: str) -> None:
    shown = tenant_reason(reason)
    assert shown is not None and kept in shown
    for secret in hidden:
        assert secret not in shown
    assert tenant_reason(None) is None


def test_passwords_never_reach_a_log_line() -> None:
    assert redact_secrets("postgresql://cbm:s3cr%40t@h:5432/db") == "postgresql://cbm:***@h:5432/db"
    assert redact_secrets("host=h password='a b' dbname=x") == "host=h password=*** dbname=x"
    assert redact_secrets("amqp://u@h/v and a=b") == "amqp://u@h/v and a=b"
    out = io.StringIO()
    configure(fmt="json", stream=out, force=True)
    try:
        get_logger("test").warning("db.failed", dsn="postgresql://u:hunter2@h/db", error="password=hunter2 x")
        try:
            raise RuntimeError("amqp://admin:hunter2@mq/v refused")
        except RuntimeError:
            get_logger("test").exception("bus.failed")
    finally:
        configure(force=True)
        structlog.reset_defaults()
        configure(force=True)
    text = out.getvalue()
    assert "hunter2" not in text and text.count("***") >= 3, text
    assert [json.loads(line)["event"] for line in text.splitlines()] == ["db.failed", "bus.failed"]


def test_plot_renders_without_pyplot() -> None:
    """pyplot keeps global state and is not thread-safe; the plot route must not even import it."""
    code = (
        "import sys\n"
        "from api.v1 import render_plot\n"
        "obs = [{'scene_id': i, 'acquired': f'2024-05-0{i}T10:00:00Z', 'value': 0.1 * i} for i in range(1, 4)]\n"
        "png = render_plot('t', {'observations': obs[:2], 'index': 'ndvi', 'bands': ['B08', 'B04']}, obs, 0.1)\n"
        "assert png.startswith(b'\\x89PNG'), png[:8]\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_trusted_proxies_are_addresses_or_networks_never_everyone() -> None:
    assert ApiSettings(trusted_proxies="127.0.0.1, 10.0.0.0/8,::1").proxy_hosts() == ["127.0.0.1", "10.0.0.0/8", "::1"]
    assert ApiSettings().proxy_hosts() == []
    assert ApiSettings(trusted_proxies="10.1.2.3/8").proxy_hosts() == ["10.0.0.0/8"]  # as uvicorn matches it
    for bad in ("*", "proxy.example.org", "10.0.0.0/33"):
        with pytest.raises(ValidationError, match="not an IP address or network"):
            ApiSettings(trusted_proxies=bad)
