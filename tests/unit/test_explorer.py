"""The explorer's pieces that need no server: session tokens (signature, expiry, the password
fingerprint), the fixed table of static files with the vendored libraries and their licences,
and the web-mercator tile arithmetic against pyproj."""

from __future__ import annotations

import math
import re

import pytest
from pyproj import Transformer

from api.auth import AuthenticationError
from api.explorer import STATIC_DIR, open_session, password_fingerprint, session_key, sign_session, static_files
from api.tiles import tile_bounds

KEY = session_key(b"0" * 32)


def test_a_session_token_round_trips_and_expires() -> None:
    token = sign_session(KEY, "alice", password_fingerprint("$argon2id$hash-1"), 2_000_000_000)
    assert token.startswith("cbms_")
    assert open_session(KEY, token, now=1_999_999_999) == (
        "alice",
        password_fingerprint("$argon2id$hash-1"),
        2_000_000_000,
    )
    with pytest.raises(AuthenticationError, match="expired"):
        open_session(KEY, token, now=2_000_000_000)


def test_forged_altered_and_foreign_tokens_are_refused() -> None:
    token = sign_session(KEY, "alice", "f" * 24, 2_000_000_000)
    body, mac = token.removeprefix("cbms_").split(".")
    bob = sign_session(KEY, "bob", "f" * 24, 2_000_000_000).removeprefix("cbms_").split(".")[0]
    for forged in (
        f"cbms_{bob}.{mac}",  # another payload under alice's MAC
        f"cbms_{body}.{'A' * 43}",
        sign_session(session_key(b"1" * 32), "alice", "f" * 24, 2_000_000_000),  # another server's key
        token[:-1],
        "cbms_",
        "cbmf_0123456789ab_" + "x" * 43,
    ):
        with pytest.raises(AuthenticationError):
            open_session(KEY, forged, now=0)


def test_the_fingerprint_follows_the_stored_hash() -> None:
    a, b = password_fingerprint("$argon2id$v=19$salt1$hash"), password_fingerprint("$argon2id$v=19$salt2$hash")
    assert a != b and len(a) == 24 and re.fullmatch(r"[0-9a-f]+", a)
    assert "salt1" not in a


def test_static_files_are_a_fixed_table_with_the_vendored_libraries_and_their_licences() -> None:
    files = static_files()
    assert {"index.html", "explorer.js", "explorer.css", "maplibre-gl-csp.js", "maplibre-gl-csp-worker.js"} <= set(
        files
    )
    assert {"uPlot.iife.min.js", "uPlot.min.css", "maplibre-gl.css"} <= set(files)
    assert all(path.resolve().is_relative_to(STATIC_DIR.resolve()) for path in files.values())
    vendored = {path.parent for path in files.values() if "vendor" in path.parts}
    assert len(vendored) == 2
    for folder in vendored:
        assert any(p.name.startswith("LICENSE") for p in folder.iterdir()), folder
    page = files["index.html"].read_text()
    for src in re.findall(r'(?:src|href)="/static/([^"]+)"', page):
        assert src in files, src


@pytest.mark.parametrize(("z", "x", "y"), [(0, 0, 0), (13, 4340, 2840), (17, 69570, 45425)])
def test_tile_bounds_are_the_slippy_map_tiles(z: int, x: int, y: int) -> None:
    west, south, east, north = tile_bounds(z, x, y)
    to_lonlat = Transformer.from_crs(3857, 4326, always_xy=True)
    lon_w, lat_n = to_lonlat.transform(west, north)
    lon_e, lat_s = to_lonlat.transform(east, south)
    # OSM's formulae: lon = x / 2^z * 360 - 180, lat = atan(sinh(pi (1 - 2 y / 2^z)))
    n = 2**z
    assert lon_w == pytest.approx(x / n * 360 - 180, abs=1e-9)
    assert lon_e == pytest.approx((x + 1) / n * 360 - 180, abs=1e-9)
    assert lat_n == pytest.approx(math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / n)))), abs=1e-9)
    assert lat_s == pytest.approx(math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (y + 1) / n)))), abs=1e-9)
