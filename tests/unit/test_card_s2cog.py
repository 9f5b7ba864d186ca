"""earth-search S2 L2A COG Items and per-polarisation S1 backscatter Items.

The Item shape is a recorded earth-search v1 response (tests/data, source noted there); the
``sentinel-2-c1-l2a`` variant is derived from it the way that collection differs (no
``earthsearch:boa_offset_applied``, ESA's DN). Rows are checked against the SAFE of the same
acquisition and against the generator's truth, not against the COG reader's own output.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from card.s1 import MissingPolarisationError
from card.s1rtc import open_s1_rtc_item
from card.s2 import MissingBandError
from card.s2cog import gdal_href, is_item_location, load_item, open_s2_cog_item, resolve_href
from card.testworld import RTC_NODATA, WorldSummary, generate
from worker import extract

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "earth_search_s2_l2a_item.json"


@pytest.fixture
def recorded() -> dict[str, Any]:
    return load_item(FIXTURE)


def as_c1(item: dict[str, Any]) -> dict[str, Any]:
    """The same acquisition as a ``sentinel-2-c1-l2a`` Item: ESA's DN, no offset-applied flag."""
    c1 = copy.deepcopy(item)
    del c1["properties"]["earthsearch:boa_offset_applied"]
    c1["collection"] = "sentinel-2-c1-l2a"
    c1["id"] = "S2A_T39QTA_20230628T070631_L2A"
    c1["assets"] = {k: v for k, v in c1["assets"].items() if not k.endswith("-jp2")}
    return c1


def test_recorded_offset_applied_item(recorded: dict[str, Any]) -> None:
    p = open_s2_cog_item(recorded, "https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a/items/x")
    assert p.product_name == "S2A_MSIL2A_20230628T070631_N0509_R106_T39QTA_20230628T113955"
    assert (p.mission, p.tile_id, p.epsg, p.processing_baseline) == ("S2A", "39QTA", 32639, "05.09")
    assert p.sensing_time.isoformat() == "2023-06-28T07:24:41.632000+00:00"
    assert p.offset_applied is True
    # AOT and the thumbnail are no bands; the JP2 twin of red is another product model and is skipped.
    assert set(p.bands) == {"B02", "B04", "B05", "B08", "B8A", "B11", "SCL"}
    assert p.band_href("B04").endswith("/S2A_39QTA_20230628_0_L2A/B04.tif")
    # The asset says offset -0.1, but the flag says the COG DN already carry it: add nothing.
    assert {b: p.reflectance_offset(b) for b in p.bands} == dict.fromkeys(p.bands, 0)
    assert p.nodata("B04") == 0
    with pytest.raises(MissingBandError, match="B12"):
        p.band_href("B12")


def test_c1_item_applies_the_declared_offset(recorded: dict[str, Any]) -> None:
    p = open_s2_cog_item(as_c1(recorded))
    assert p.offset_applied is None and p.collection == "sentinel-2-c1-l2a"
    assert {b: p.reflectance_offset(b) for b in p.bands} == {
        **dict.fromkeys(("B02", "B04", "B05", "B08", "B8A", "B11"), -1000),
        "SCL": 0,
    }


def test_flag_false_is_trusted_only_before_baseline_04(recorded: dict[str, Any]) -> None:
    item = copy.deepcopy(recorded)
    item["properties"]["earthsearch:boa_offset_applied"] = False
    with pytest.raises(ValueError, match=r"unreliable.*earth-search#66"):
        open_s2_cog_item(item)
    item["properties"]["s2:processing_baseline"] = "02.14"
    assert open_s2_cog_item(item).reflectance_offset("B04") == 0


def test_radiometry_that_would_change_the_units_is_refused(recorded: dict[str, Any]) -> None:
    item = as_c1(recorded)
    item["assets"]["red"]["raster:bands"][0]["scale"] = 0.0002
    with pytest.raises(ValueError, match="scale"):
        open_s2_cog_item(item)
    item = as_c1(recorded)
    item["assets"]["red"]["raster:bands"][0]["offset"] = -0.10005
    with pytest.raises(ValueError, match="whole number"):
        open_s2_cog_item(item)
    item = as_c1(recorded)
    item["assets"] = {"thumbnail": item["assets"]["thumbnail"]}
    with pytest.raises(ValueError, match="no Sentinel-2 band assets"):
        open_s2_cog_item(item)


def test_locations_and_hrefs(tmp_path: Path) -> None:
    assert is_item_location("https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a/items/S2A_x")
    assert is_item_location("s3://bucket/items/x.json") and is_item_location("/data/x.json")
    assert not is_item_location("s3://bucket/S2A_MSIL2A_x.SAFE") and not is_item_location("/data/x.SAFE/")
    assert not is_item_location("/data/card_bs.tif")
    assert gdal_href("https://h/x.tif") == "/vsicurl/https://h/x.tif"
    assert gdal_href("file:///d/x.tif") == "/d/x.tif" and gdal_href("s3://b/k.tif") == "s3://b/k.tif"
    assert resolve_href("./B04.tif", "https://h/items/a/item.json") == "https://h/items/a/B04.tif"
    assert resolve_href("B04.tif", str(tmp_path / "a" / "item.json")) == str(tmp_path / "a" / "B04.tif")
    assert resolve_href("s3://b/k.tif", "https://h/i.json") == "s3://b/k.tif"
    assert resolve_href("./B04.tif", "s3://b/items/a/item.json") == "s3://b/items/a/B04.tif"
    (tmp_path / "not.json").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="not a STAC Item"):
        load_item(tmp_path / "not.json")


# --- one acquisition, three product models ----------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(
        tmp_path_factory.mktemp("esworld"), parcels=60, scenes=2, seed=7, s1_scenes=1, earth_search_items=True
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_generated_items_are_earth_search_shaped(world: WorldSummary, recorded: dict[str, Any]) -> None:
    assert len(world.earth_search_item_paths) == 2 * len(world.product_paths)
    l2a, c1 = (load_item(p) for p in world.earth_search_item_paths[:2])
    assert (l2a["collection"], c1["collection"]) == ("sentinel-2-l2a", "sentinel-2-c1-l2a")
    assert l2a["properties"]["earthsearch:boa_offset_applied"] is True
    assert "earthsearch:boa_offset_applied" not in c1["properties"]
    for item in (l2a, c1):
        for key in ("red", "nir", "scl"):
            assert item["assets"][key]["type"] == recorded["assets"][key]["type"]
            assert set(item["assets"][key]["raster:bands"][0]) == set(recorded["assets"][key]["raster:bands"][0])
        assert item["assets"]["red"]["raster:bands"][0]["offset"] == -0.1  # as published, in both flavours
    # Offset applied: the COG DN are the SAFE's minus 1000, no-data kept.
    with rasterio.open(l2a["assets"]["red"]["href"]) as a, rasterio.open(c1["assets"]["red"]["href"]) as b:
        da, db = a.read(1).astype(np.int32), b.read(1).astype(np.int32)
    assert ((da == 0) == (db == 0)).all() and (db > 0).any()
    assert (da[db > 1000] == db[db > 1000] - 1000).all()


def test_cog_items_give_the_rows_of_the_safe_and_the_truth(world: WorldSummary) -> None:
    """The acquisition read from the SAFE, the ``sentinel-2-l2a`` Item (DN already offset) and the
    ``sentinel-2-c1-l2a`` Item (offset to apply) gives identical statistics and SCL histograms, and
    they reproduce the generator's truth (its own labels and DN, not our engine)."""
    parcels = extract.read_parcels(world.parcels_path, "parcel_id")
    truth = {(r["parcel_id"], r["product_id"], r["band"]): r for r in read_csv(world.truth_path)}
    scl_truth = {(r["parcel_id"], r["product_id"], r["class"]): int(r["count"]) for r in read_csv(world.truth_scl_path)}
    for i, safe in enumerate(world.product_paths):
        name = world.products[i]
        safe_rows = extract.extract([extract.resolve_product(str(safe))], parcels)
        assert len(safe_rows.stats["pid"]) > 100
        for item in world.earth_search_item_paths[2 * i : 2 * i + 2]:
            product = extract.resolve_product(str(item))
            assert product.name == name
            rows = extract.extract([product], parcels)
            assert rows.stats == safe_rows.stats, item
            assert rows.classes == safe_rows.classes, item
        mine = {
            (p, name, b): (c, m)
            for p, b, c, m in zip(*(safe_rows.stats[k] for k in ("pid", "band", "count", "mean")), strict=True)
        }
        expected = {k: v for k, v in truth.items() if k[1] == name}
        assert set(mine) == set(expected)
        for key, t in expected.items():
            assert mine[key][0] == int(t["count"]), key
            assert mine[key][1] == pytest.approx(float(t["mean"]), rel=1e-9), key
        scl = {
            (p, name, str(c)): n
            for p, c, n in zip(*(safe_rows.classes[k] for k in ("pid", "class", "count")), strict=True)
        }
        assert scl == {k: v for k, v in scl_truth.items() if k[1] == name}


def test_offset_applied_item_with_a_mislabelled_flag_fails(world: WorldSummary, tmp_path: Path) -> None:
    item = load_item(world.earth_search_item_paths[0])
    item["properties"]["earthsearch:boa_offset_applied"] = False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(item))
    with pytest.raises(extract.ExtractError, match="unreliable"):
        extract.resolve_product(str(bad))


# --- Sentinel-1 backscatter, one COG per polarisation -------------------------------------------


def test_rtc_item_reads_as_bs_and_gives_the_card_truth(world: WorldSummary) -> None:
    [rtc] = world.s1_rtc_item_paths
    item = load_item(rtc)
    assert set(item["assets"]) == {"vv", "vh"}
    product = open_s1_rtc_item(item, str(rtc))
    assert product.layout == "assets" and product.epsg == 32632
    assert [(b.polarisation, b.band, b.nodata) for b in product.bands] == [("VV", 1, RTC_NODATA), ("VH", 1, RTC_NODATA)]
    card = world.s1_product_paths[0]
    with rasterio.open(product.band("VV").path) as src:
        vv = src.read(1)
    assert (vv == RTC_NODATA).any() and not np.isnan(vv).any()  # NaN of the CARD product became -32768
    names = {"VV": "VVb", "VH": "VHb"}
    bands = tuple(
        extract.BandSource(names[b.polarisation], b.path, b.band, b.nodata, 0.0, False) for b in product.bands
    )
    rows = extract.extract(
        [extract.Product(product.product_name, bands)], extract.read_parcels(world.parcels_path, "parcel_id")
    )
    truth = {(r["parcel_id"], r["band"]): r for r in read_csv(world.truth_path) if r["product_id"] == card.stem}
    assert truth and len(rows.stats["pid"]) == len(truth)
    for pid, band, count, mean in zip(*(rows.stats[k] for k in ("pid", "band", "count", "mean")), strict=True):
        t = truth[(pid, band)]
        assert count == int(t["count"]), (pid, band)
        assert mean == pytest.approx(float(t["mean"]), rel=1e-6), (pid, band)


def test_rtc_item_errors(world: WorldSummary) -> None:
    [rtc] = world.s1_rtc_item_paths
    item = load_item(rtc)
    no_vh = copy.deepcopy(item)
    del no_vh["assets"]["vh"]
    with pytest.raises(MissingPolarisationError, match="VH"):
        open_s1_rtc_item(no_vh, str(rtc))
    db = copy.deepcopy(item)
    db["assets"]["vv"]["raster:bands"][0]["unit"] = "dB"
    with pytest.raises(ValueError, match="linear"):
        open_s1_rtc_item(db, str(rtc))
    twice = copy.deepcopy(item)
    twice["assets"]["gamma0_vv"] = twice["assets"]["vv"]
    with pytest.raises(ValueError, match="both VV"):
        open_s1_rtc_item(twice, str(rtc))


# --- the band set (a dataset setting, datasets.s2_bands) -----------------------------------------


def test_band_groups_default_is_jrcs_and_any_band_goes_to_its_native_grid() -> None:
    from worker.bands import s2_band_groups

    assert s2_band_groups(None) == [(("B02", "B03", "B04", "B08"), False), (("B05", "B11"), True)]
    assert s2_band_groups(["B04", "b8a", "B01", "B12", "B2", "B04"]) == [
        (("B04", "B02"), False),
        (("B8A", "B12"), True),
        (("B01",), False),
    ]
    assert s2_band_groups(["B08"]) == [(("B08",), False), (("SCL",), False)]  # histograms always
    with pytest.raises(ValueError, match="B10"):
        s2_band_groups(["B10"])
