"""The explorer's map routes on a real PostGIS: parcel vector tiles decoded by a protobuf reader
written from the Mapbox Vector Tile 2.1 specification (not by the code that wrote them) and
compared with the generator's parcels reprojected by pyproj/shapely; the true-colour tiles against
the JP2's own pixels; grants, ETags and the explorer's session tokens."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from PIL import Image
from pyproj import Transformer
from starlette.testclient import TestClient
from test_api import ALICE, BOB, ROOT, _error, _hash, _json

from api.app import create_app
from api.explorer import open_session
from card.s2 import open_s2_product
from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.parcels.ingest import add_aoi, import_parcels
from cbmflow.settings import ApiSettings, WatchSettings

BASE = "/api/v1/datasets/ms/2024"
HALF = 20037508.342789244  # half the web-mercator world, EPSG:3857 metres

# --- a minimal MVT reader (https://github.com/mapbox/vector-tile-spec/tree/master/2.1) ------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: varints as int, length-delimited as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise AssertionError(f"wire type {wire}")
        yield number, value


def _packed(buf: bytes) -> list[int]:
    out, i = [], 0
    while i < len(buf):
        v, i = _varint(buf, i)
        out.append(v)
    return out


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


@dataclass
class Feature:
    id: int | None
    props: dict[str, Any]
    rings: list[list[tuple[int, int]]]


@dataclass
class Layer:
    name: str = ""
    extent: int = 4096
    version: int = 1
    features: list[Feature] = field(default_factory=list)


def _value(buf: bytes) -> Any:
    for number, v in _fields(buf):
        if number == 1:
            return v.decode("utf-8")
        if number in (4, 5):
            return v
        if number == 6:
            return _zigzag(v)
        if number == 7:
            return bool(v)
    raise AssertionError("unsupported value type")


def _geometry(commands: list[int]) -> list[list[tuple[int, int]]]:
    """Rings of a POLYGON geometry: MoveTo, LineTo..., ClosePath, with zig-zag deltas."""
    rings: list[list[tuple[int, int]]] = []
    x = y = i = 0
    while i < len(commands):
        cmd, count = commands[i] & 7, commands[i] >> 3
        i += 1
        if cmd == 7:
            rings[-1].append(rings[-1][0])
            continue
        for _ in range(count):
            x += _zigzag(commands[i])
            y += _zigzag(commands[i + 1])
            i += 2
            if cmd == 1:
                rings.append([(x, y)])
            else:
                rings[-1].append((x, y))
    return rings


def decode(tile: bytes) -> dict[str, Layer]:
    layers = {}
    for number, raw in _fields(tile):
        assert number == 3
        layer, keys, values, feats = Layer(), [], [], []
        for n, v in _fields(raw):
            if n == 1:
                layer.name = v.decode()
            elif n == 2:
                feats.append(v)
            elif n == 3:
                keys.append(v.decode())
            elif n == 4:
                values.append(_value(v))
            elif n == 5:
                layer.extent = v
            elif n == 15:
                layer.version = v
        for raw_feature in feats:
            fid, tags, gtype, geom = None, [], 0, []
            for n, v in _fields(raw_feature):
                if n == 1:
                    fid = v
                elif n == 2:
                    tags = _packed(v)
                elif n == 3:
                    gtype = v
                elif n == 4:
                    geom = _packed(v)
            assert gtype == 3, "parcels are polygons"
            props = {keys[tags[k]]: values[tags[k + 1]] for k in range(0, len(tags), 2)}
            layer.features.append(Feature(fid, props, _geometry(geom)))
        layers[layer.name] = layer
    return layers


def _ring_area(ring: list[tuple[int, int]]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False)) / 2


def feature_polygon(feature: Feature, z: int, x: int, y: int, extent: int) -> shapely.Geometry:
    """The feature in EPSG:3857: exterior rings are clockwise in tile coordinates (y down), as the
    specification says, and each one starts a polygon that the following holes belong to."""
    size = 2 * HALF / 2**z
    west, north = -HALF + x * size, HALF - y * size
    polys: list[tuple[list[tuple[float, float]], list[list[tuple[float, float]]]]] = []
    for ring in feature.rings:
        world = [(west + px / extent * size, north - py / extent * size) for px, py in ring]
        if _ring_area(ring) > 0:  # clockwise with y pointing down: an exterior ring
            polys.append((world, []))
        else:
            assert polys, "a hole before any exterior ring"
            polys[-1][1].append(world)
    return shapely.MultiPolygon([shapely.Polygon(shell, holes) for shell, holes in polys])


# --- the world ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("tileworld"), parcels=30, scenes=1, seed=5, aoi_name="ms", year=2024)


@dataclass
class Seeded:
    dsn: str
    parcels: dict[str, tuple[str, shapely.Geometry]]  # parcel id → (crop, geometry in EPSG:3857)


@pytest.fixture
def seeded(world: WorldSummary, pg_dsn: str) -> Seeded:
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        report = import_parcels(cur, world.parcels_path, "ms", 2024)
        cur.execute("INSERT INTO aois (name, geom) VALUES ('xx', ST_Multi(ST_MakeEnvelope(-48, -16, -47, -15, 4326)))")
        for (name, password), admin, grants in ((ALICE, False, ["ms"]), (BOB, False, ["xx"]), (ROOT, True, [])):
            cur.execute(
                "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, %s)", (name, _hash(password), admin)
            )
            for aoi in grants:
                cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s)", (name, aoi))
    rejected = {str(r[0]) for r in report.rejected}
    frame = pyogrio.read_dataframe(world.parcels_path)
    to_merc = Transformer.from_crs(frame.crs, 3857, always_xy=True)
    parcels = {}
    for pid, crop, geom in zip(frame.parcel_id, frame.crop_name, frame.geometry, strict=True):
        if pid in rejected or pid in {r[1] for r in report.rejected}:
            continue
        parcels[str(pid)] = (
            str(crop),
            shapely.make_valid(
                shapely.transform(geom, lambda xy: np.column_stack(to_merc.transform(xy[:, 0], xy[:, 1])))
            ),
        )
    assert len(parcels) >= 20
    return Seeded(pg_dsn, parcels)


@pytest.fixture
def client(seeded: Seeded) -> Iterator[TestClient]:
    settings = ApiSettings(dataset_cache_s=0, chip_secret="tile-test", login_backoff_base_s=0)
    with TestClient(create_app(db.role_dsn(seeded.dsn, "api"), settings)) as c:
        yield c


def _tiles_over(bounds: tuple[float, float, float, float], z: int) -> list[tuple[int, int]]:
    """XYZ tiles covering EPSG:3857 bounds, by the slippy-map formula."""
    size = 2 * HALF / 2**z
    x0, x1 = int((bounds[0] + HALF) // size), int((bounds[2] + HALF) // size)
    y0, y1 = int((HALF - bounds[3]) // size), int((HALF - bounds[1]) // size)
    return [(x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]


def test_vector_tiles_hold_every_parcel_with_its_shape_and_crop(client: TestClient, seeded: Seeded) -> None:
    z = 15
    everything = shapely.unary_union([g for _, g in seeded.parcels.values()])
    size = 2 * HALF / 2**z
    unit = size / 4096
    seen: dict[str, list[shapely.Geometry]] = {}
    tiles = _tiles_over(everything.bounds, z)
    assert len(tiles) >= 2, "the check must span tile edges"
    for x, y in tiles:
        resp = client.get(f"{BASE}/tiles/{z}/{x}/{y}.mvt", auth=ALICE)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/vnd.mapbox-vector-tile"
        assert "private" in resp.headers["cache-control"] and resp.headers["etag"]
        if not resp.content:
            continue
        layer = decode(resp.content)["parcels"]
        assert layer.version == 2 and layer.extent == 4096
        west, north = -HALF + x * size, HALF - y * size
        buffered = shapely.box(west, north - size, west + size, north).buffer(size * 64 / 4096, join_style="mitre")
        for feature in layer.features:
            pid = feature.props["pid"]
            crop, truth = seeded.parcels[pid]
            assert feature.props["crop"] == crop and isinstance(feature.id, int)
            got = feature_polygon(feature, z, x, y, layer.extent)
            want = truth.intersection(buffered)
            # Vertices snap to the 4096 grid (0.3 m here): the outline may move by up to one step.
            assert got.symmetric_difference(want).area <= want.length * unit, pid
            seen.setdefault(pid, []).append(got)
    assert set(seen) == set(seeded.parcels), "every parcel is in some tile, and nothing else is"
    for pid, parts in seen.items():
        whole = shapely.unary_union(parts)
        truth = seeded.parcels[pid][1]
        assert whole.symmetric_difference(truth).area <= truth.length * unit, pid


def test_empty_tiles_low_zooms_and_bad_addresses(client: TestClient, seeded: Seeded) -> None:
    far = client.get(f"{BASE}/tiles/14/0/0.mvt", auth=ALICE)  # the Bering Sea
    assert far.status_code == 200 and far.content == b""
    everything = shapely.unary_union([g for _, g in seeded.parcels.values()])
    x, y = _tiles_over(everything.bounds, 8)[0]
    low = client.get(f"{BASE}/tiles/8/{x}/{y}.mvt", auth=ALICE)
    assert low.status_code == 200 and low.content == b"", "below the parcel zooms a tile is empty"
    for bad in ("14/16384/0", "14/0/16384", "23/0/0", "-1/0/0", "a/0/0"):
        _error(client.get(f"{BASE}/tiles/{bad}.mvt", auth=ALICE), 400, "invalid_input")


def test_grants_hide_tiles_and_the_dataset(client: TestClient, seeded: Seeded) -> None:
    everything = shapely.unary_union([g for _, g in seeded.parcels.values()])
    x, y = _tiles_over(everything.bounds, 15)[0]
    url = f"{BASE}/tiles/15/{x}/{y}.mvt"
    _error(client.get(url), 401, "unauthorized")
    _error(client.get(url, auth=BOB), 403, "forbidden")
    _error(client.get(f"{BASE}/tiles.json", auth=BOB), 403, "forbidden")
    assert _json(client.get("/api/v1/datasets", auth=BOB)) == {"datasets": []}
    _error(client.get(f"/api/v1/datasets/ms/2023/tiles/15/{x}/{y}.mvt", auth=ROOT), 404, "not_found")
    assert client.get(url, auth=ROOT).status_code == 200


def test_etag_revalidates_and_follows_the_parcels_version(client: TestClient, seeded: Seeded) -> None:
    everything = shapely.unary_union([g for _, g in seeded.parcels.values()])
    x, y = _tiles_over(everything.bounds, 15)[0]
    url = f"{BASE}/tiles/15/{x}/{y}.mvt"
    first = client.get(url, auth=ALICE)
    etag = first.headers["etag"]
    again = client.get(url, auth=ALICE, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    # The grant is checked before the cache: a stranger holding the ETag learns nothing.
    _error(client.get(url, auth=BOB, headers={"If-None-Match": etag}), 403, "forbidden")
    with db.transaction(seeded.dsn) as cur:
        cur.execute("UPDATE datasets SET parcels_version = parcels_version + 1 WHERE aoi = 'ms'")
    changed = client.get(url, auth=ALICE, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag and changed.content == first.content


def test_tilejson_bounds_and_crop_legend(client: TestClient, seeded: Seeded, world: WorldSummary) -> None:
    doc = _json(client.get(f"{BASE}/tiles.json", auth=ALICE))
    assert doc["tilejson"] == "3.0.0" and doc["tiles"][0].endswith("/api/v1/datasets/ms/2024/tiles/{z}/{x}/{y}.mvt")
    w, s, e, n = world.aoi_bbox
    assert doc["bounds"] == pytest.approx([w, s, e, n], abs=1e-5)
    counts: dict[str, int] = {}
    for crop, _ in seeded.parcels.values():
        counts[crop] = counts.get(crop, 0) + 1
    assert {c["name"]: c["parcels"] for c in doc["crops"]} == counts
    assert [c["parcels"] for c in doc["crops"]] == sorted(counts.values(), reverse=True)


def test_session_tokens(client: TestClient, seeded: Seeded) -> None:
    resp = client.post("/api/v1/auth/token", auth=ALICE)
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert body["user"] == "alice" and body["token_type"] == "Bearer" and 3500 <= body["expires_in"] <= 3600
    bearer = {"Authorization": f"Bearer {body['token']}"}
    assert [d["aoi"] for d in _json(client.get("/api/v1/datasets", headers=bearer))["datasets"]] == ["ms"]
    who = _json(client.get("/api/v1/auth/token", headers=bearer))
    assert who["user"] == "alice" and who["grants"] == ["ms"] and who["expires_at"] == body["expires_at"]
    assert _json(client.get("/api/v1/auth/token", auth=ALICE))["expires_at"] is None
    # A session cannot renew itself; a wrong password opens none.
    _error(client.post("/api/v1/auth/token", headers=bearer), 400, "invalid_input")
    wrong = client.post("/api/v1/auth/token", auth=("alice", "wrong"))
    _error(wrong, 401, "unauthorized")
    assert "www-authenticate" not in wrong.headers, "no browser password dialog over the login form"
    # Altered tokens are refused.
    token = body["token"]
    for forged in (
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token.replace("cbms_", "cbms_x"),
        "cbms_",
    ):
        _error(client.get("/api/v1/datasets", headers={"Authorization": f"Bearer {forged}"}), 401, "unauthorized")
    bob = client.post("/api/v1/auth/token", auth=BOB).json()["token"]
    assert _json(client.get("/api/v1/datasets", headers={"Authorization": f"Bearer {bob}"})) == {"datasets": []}
    everything = shapely.unary_union([g for _, g in seeded.parcels.values()])
    x, y = _tiles_over(everything.bounds, 15)[0]
    _error(client.get(f"{BASE}/tiles/15/{x}/{y}.mvt", headers={"Authorization": f"Bearer {bob}"}), 403, "forbidden")
    assert client.get(f"{BASE}/tiles/15/{x}/{y}.mvt", headers=bearer).status_code == 200
    # Expiry is in the signed payload.
    from api.explorer import session_key

    key = session_key(__import__("hashlib").sha256(b"tile-test").digest())
    user, _, expires = open_session(key, token)
    assert user == "alice"
    with pytest.raises(Exception, match="expired"):
        open_session(key, token, now=expires + 1)
    # A new password ends every session opened with the old one.
    with db.transaction(seeded.dsn) as cur:
        cur.execute("UPDATE users SET password_hash = %s WHERE name = 'alice'", (_hash("another-secret-9"),))
    _error(client.get("/api/v1/datasets", headers=bearer), 401, "unauthorized")


def test_the_page_and_its_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("explorer.js", "explorer.css", "maplibre-gl-csp.js", "maplibre-gl-csp-worker.js", "uPlot.iife.min.js"):
        assert f"/static/{name}" in page.text or name == "maplibre-gl-csp-worker.js" or name.endswith(".css")
        resp = client.get(f"/static/{name}")
        assert resp.status_code == 200 and len(resp.content) > 1000, name
        assert client.get(f"/static/{name}", headers={"If-None-Match": resp.headers["etag"]}).status_code == 304
    for bad in ("../app.py", "..%2Fapp.py", "nothing.js", "LICENSE"):
        assert client.get(f"/static/{bad}").status_code in (400, 404), bad


# --- true colour ----------------------------------------------------------------------------------


@pytest.fixture
def scene_id(world: WorldSummary, seeded: Seeded, cbm_env: Any) -> int:
    settings = WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0)
    report = watch_once(dsn=seeded.dsn, settings=settings)
    assert report.new == 1
    with db.transaction(seeded.dsn) as cur:
        cur.execute("SELECT id FROM scenes")
        return int(cur.fetchone()[0])


def test_true_colour_tile_is_the_products_reflectance(
    client: TestClient, world: WorldSummary, seeded: Seeded, scene_id: int
) -> None:
    product = open_s2_product(world.product_paths[0])
    w, s, e, n = world.aoi_bbox
    lon, lat = (w + e) / 2, (s + n) / 2
    z = 17  # about 0.8 m per pixel at 48° N: GDAL's bilinear kernel is then 2 x 2 source pixels
    mx, my = Transformer.from_crs(4326, 3857, always_xy=True).transform(lon, lat)
    size = 2 * HALF / 2**z
    x, y = int((mx + HALF) // size), int((HALF - my) // size)
    resp = client.get(f"{BASE}/scenes/{scene_id}/truecolor/{z}/{x}/{y}.png", auth=ALICE)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(resp.content)))
    assert img.shape == (256, 256, 4) and (img[..., 3] == 255).all(), "the AOI's centre is all imagery"
    west, north = -HALF + x * size, HALF - y * size
    to_raster = Transformer.from_crs(3857, product.epsg, always_xy=True)
    for band_index, band in enumerate(("B04", "B03", "B02")):
        with rasterio.open(product.band_path(band)) as src:
            dn = src.read(1).astype(float)
            inv = ~src.transform
        refl = (dn + product.reflectance_offset(band)) / product.quantification_value
        byte = np.clip(np.round(refl / 0.25 * 255), 0, 255)
        for row, col in ((10, 10), (128, 128), (200, 40), (60, 230)):
            px, py = to_raster.transform(west + (col + 0.5) * size / 256, north - (row + 0.5) * size / 256)
            c, r = inv * (px, py)
            # Bilinear: a weighted mean of the 4 source pixels whose centres surround the point.
            c0, r0 = math.floor(c - 0.5), math.floor(r - 0.5)
            around = byte[r0 : r0 + 2, c0 : c0 + 2]
            got = int(img[row, col, band_index])
            assert around.min() - 1 <= got <= around.max() + 1, (band, row, col, got, around)
    assert img[..., :3].std() > 3, "real imagery, not a flat colour"

    # Outside the AOI the tile is transparent; grants and unknown scenes as everywhere.
    outside = client.get(f"{BASE}/scenes/{scene_id}/truecolor/{z}/{x + 50}/{y}.png", auth=ALICE)
    assert (np.asarray(Image.open(io.BytesIO(outside.content)))[..., 3] == 0).all()
    _error(client.get(f"{BASE}/scenes/{scene_id}/truecolor/{z}/{x}/{y}.png", auth=BOB), 403, "forbidden")
    _error(client.get(f"{BASE}/scenes/{scene_id + 99}/truecolor/{z}/{x}/{y}.png", auth=ALICE), 404, "not_found")
    etag = resp.headers["etag"]
    again = client.get(
        f"{BASE}/scenes/{scene_id}/truecolor/{z}/{x}/{y}.png", auth=ALICE, headers={"If-None-Match": etag}
    )
    assert again.status_code == 304
