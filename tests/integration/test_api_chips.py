"""Chips (JRC ``rawChipByLocation``, ``chipsByLocation``) from real SAFE products of a generated
test world, catalogued by the real watcher: the chip a signed URL returns holds exactly the JP2's
pixels, the URL works without credentials and dies with the grant, and grants hold on location."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio.windows import from_bounds
from starlette.testclient import TestClient
from test_api import ALICE, BOB, ROOT, _error, _hash, _json

from api.app import create_app
from card.s2 import open_s2_product
from card.testworld import WorldSummary, generate
from catalog_watcher.service import watch_once
from cbmflow import db
from cbmflow.parcels.ingest import add_aoi
from cbmflow.settings import ApiSettings, WatchSettings

SCENES = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("chipworld"), parcels=10, scenes=SCENES, seed=3, aoi_name="ms", year=2024)


@pytest.fixture
def client(world: WorldSummary, cbm_env: Any, pg_dsn: str) -> Iterator[TestClient]:
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "ms", world.aoi_path)
        cur.execute("INSERT INTO aois (name, geom) VALUES ('xx', ST_Multi(ST_MakeEnvelope(-48, -16, -47, -15, 4326)))")
        for (name, password), admin, grants in ((ALICE, False, ["ms"]), (BOB, False, ["xx"]), (ROOT, True, [])):
            cur.execute(
                "INSERT INTO users (name, password_hash, is_admin) VALUES (%s, %s, %s)", (name, _hash(password), admin)
            )
            for aoi in grants:
                cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s)", (name, aoi))
    report = watch_once(dsn=pg_dsn, settings=WatchSettings(catalog_url=str(world.stac_catalog_path), lookback_days=0))
    assert report.new == SCENES
    with TestClient(create_app(pg_dsn, ApiSettings(chip_secret="test-secret"))) as c:
        yield c


def _centre(world: WorldSummary) -> tuple[float, float]:
    w, s, e, n = world.aoi_bbox
    return (w + e) / 2, (s + n) / 2


def _query(world: WorldSummary, **extra: Any) -> dict[str, Any]:
    lon, lat = _centre(world)
    return {"lon": lon, "lat": lat, "start_date": "2024-01-01", "end_date": "2024-12-31", **extra}


def test_raw_chips_hold_the_products_pixels(client: TestClient, world: WorldSummary) -> None:
    body = _json(client.get("/query/rawChipByLocation", params=_query(world, band="B4", chipsize=300), auth=ALICE))
    assert set(body) == {"dates", "chips"} and len(body["chips"]) == SCENES
    products = {open_s2_product(p).product_name: open_s2_product(p) for p in world.product_paths}
    expected_dates = sorted(p.sensing_time.astimezone(UTC).strftime("%Y%m%dT%H%M%S") for p in products.values())
    assert body["dates"] == expected_dates
    lon, lat = _centre(world)
    for url in body["chips"]:
        m = re.fullmatch(r"/chips/[A-Za-z0-9_.-]+/(?P<ref>.+)\.B04\.tif", url)
        assert m, url
        product = products[m.group("ref")]
        resp = client.get(url, auth=None)  # the cbm client fetches chips without credentials
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/tiff"
        with rasterio.open(io.BytesIO(resp.content)) as chip:
            assert (chip.width, chip.height) == (30, 30)  # 300 m at 10 m
            assert chip.crs.to_epsg() == world.raster_epsg
            x, y = Transformer.from_crs(4326, chip.crs, always_xy=True).transform(lon, lat)
            left, bottom, right, top = chip.bounds
            assert left < x < right and bottom < y < top
            assert abs((left + right) / 2 - x) <= 10 and abs((top + bottom) / 2 - y) <= 10
            got = chip.read(1)
            with rasterio.open(product.band_path("B04")) as jp2:
                want = jp2.read(1, window=from_bounds(*chip.bounds, transform=jp2.transform))
        assert want.shape == got.shape and got.dtype == np.uint16
        assert np.array_equal(got, want)
        assert len(np.unique(got)) > 10  # real imagery, not a fill value


def test_chip_beyond_the_raster_is_filled_with_nodata(client: TestClient, world: WorldSummary) -> None:
    # The generated SCL raster is 84 x 72 pixels of 20 m: a 3 km chip reaches past every edge.
    params = _query(world, band="SCL", chipsize=3000, onlylist="false")
    body = _json(client.get("/query/rawChipByLocation", params=params, auth=ALICE))
    with rasterio.open(io.BytesIO(client.get(body["chips"][0]).content)) as chip:
        assert (chip.width, chip.height) == (150, 150) and chip.nodata == 0
        data, transform = chip.read(1), chip.transform
    ref = body["chips"][0].rsplit("/", 1)[1].removesuffix(".SCL.tif")
    product = next(open_s2_product(p) for p in world.product_paths if p.name == f"{ref}.SAFE")
    with rasterio.open(product.band_path("SCL")) as jp2:
        scl = jp2.read(1)
        col0, row0 = (round(v) for v in ~transform @ (jp2.transform.c, jp2.transform.f))
    inside = data[row0 : row0 + scl.shape[0], col0 : col0 + scl.shape[1]]
    assert np.array_equal(inside, scl)  # the whole raster, in place
    outside = data.copy()
    outside[row0 : row0 + scl.shape[0], col0 : col0 + scl.shape[1]] = 0
    assert not outside.any()  # and nodata around it


def test_onlylist_and_date_filter(client: TestClient, world: WorldSummary) -> None:
    names = sorted((open_s2_product(p) for p in world.product_paths), key=lambda p: p.sensing_time)
    body = _json(client.get("/query/rawChipByLocation", params=_query(world, onlylist="True"), auth=ALICE))
    assert body == {"chips": [p.product_name for p in names]}
    day = names[1].sensing_time.date().isoformat()
    one = _json(
        client.get(
            "/query/rawChipByLocation",
            params=_query(world, onlylist="True", start_date=day, end_date=day),
            auth=ALICE,
        )
    )
    assert one == {"chips": [names[1].product_name]}


def test_scene_limit_is_a_400_not_silence(world: WorldSummary, client: TestClient, pg_dsn: str) -> None:
    with TestClient(create_app(pg_dsn, ApiSettings(chip_limit=2, chip_secret="x"))) as small:
        _error(small.get("/query/rawChipByLocation", params=_query(world), auth=ALICE), 400, "invalid_input")


@pytest.mark.parametrize(
    "bad",
    [
        {"start_date": "2024-13-01"},
        {"start_date": "01/01/2024"},
        {"end_date": "2023-01-01"},
        {"start_date": ""},
        {"band": "B10"},
        {"band": "B04;rm -rf /"},
        {"chipsize": "0"},
        {"plevel": "LEVEL1C"},
        {"lon": "200"},
    ],
)
def test_bad_parameters_are_400(client: TestClient, world: WorldSummary, bad: dict[str, str]) -> None:
    _error(client.get("/query/rawChipByLocation", params=_query(world, **bad), auth=ALICE), 400, "invalid_input")


def test_grants_hold_on_location_and_on_chip_urls(client: TestClient, world: WorldSummary, pg_dsn: str) -> None:
    _error(client.get("/query/rawChipByLocation", params=_query(world)), 401, "unauthorized")
    _error(client.get("/query/rawChipByLocation", params=_query(world), auth=BOB), 403, "forbidden")
    _error(client.get("/query/chipsByLocation", params=_query(world), auth=BOB), 403, "forbidden")
    _error(client.get("/query/rawChipByLocation", params=_query(world, lon=2.0, lat=2.0), auth=ALICE), 403, "forbidden")
    # An admin may ask anywhere; where no product lies there is simply nothing.
    assert _json(client.get("/query/rawChipByLocation", params=_query(world, lon=2.0, lat=2.0), auth=ROOT)) == {
        "dates": [],
        "chips": [],
    }
    url = _json(client.get("/query/rawChipByLocation", params=_query(world), auth=ALICE))["chips"][0]
    assert client.get(url).status_code == 200
    token = url.split("/")[2]
    body, mac = token.split(".")
    for forged in (f"{body}.{'A' * 22}", f"{body[:-2]}xx.{mac}", "nonsense"):
        _error(client.get(url.replace(token, forged)), 404, "not_found")
    _error(client.get(url.rsplit("/", 1)[0] + "/OTHER.B08.tif"), 404, "not_found")
    with db.transaction(pg_dsn) as cur:
        cur.execute("DELETE FROM user_grants WHERE user_name = %s", (ALICE[0],))
    _error(client.get(url), 404, "not_found")  # a revoke also kills links already handed out


def test_rgb_chips_page(client: TestClient, world: WorldSummary) -> None:
    resp = client.get("/query/chipsByLocation", params=_query(world, bands="B08_B04_B03", lut="5_95"), auth=ALICE)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', resp.text)
    assert len(pngs) == SCENES
    for png in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(png)))
        assert img.size == (128, 128) and img.mode == "RGB"
        arr = np.asarray(img)
        assert arr.max() == 255 and arr.std() > 10  # stretched, not blank
    _error(
        client.get("/query/chipsByLocation", params=_query(world, bands="B08_B04"), auth=ALICE), 400, "invalid_input"
    )
    _error(client.get("/query/chipsByLocation", params=_query(world, lut="95_5"), auth=ALICE), 400, "invalid_input")
