"""Sentinel-1 GRD/SLC items normalise to CARD inputs keyed per acquisition, never to rejections."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from catalog_watcher.odata import to_record as odata_record
from catalog_watcher.sources import normalise
from catalog_watcher.stac import Rejected, SceneRecord, s1_input_key

DATA = Path(__file__).resolve().parents[1] / "data" / "watch"
SAFE = "S1A_IW_GRDH_1SDV_20210809T173953_20210809T174018_039156_049F13_6FF8"


def _item(name: str) -> dict[str, Any]:
    d: dict[str, Any] = json.loads((DATA / name).read_text())
    return d


def test_earthsearch_and_cdse_grd_items_are_one_card_input_acquisition() -> None:
    es = normalise(_item("earthsearch_s1_grd_item.json"), "sentinel-1-grd", "updated")
    cdse = normalise(_item("cdse_s1_grd_item.json"), "sentinel-1-grd", "published")
    assert isinstance(es, SceneRecord) and isinstance(cdse, SceneRecord)
    assert es.is_card_input and cdse.is_card_input
    assert (es.card, cdse.card) == ("grd", "grd")
    # Relative orbit 59 is stated by both items; the key is the acquisition, not the packaging.
    assert es.key == cdse.key == "S1A_IW_GRDH_R059_20210809T173953"
    assert es.relative_orbit == cdse.relative_orbit == 59
    assert es.product_id == SAFE and cdse.product_id == SAFE + "_COG"
    assert es.product_name == cdse.product_name == SAFE
    assert es.location.endswith(f"/IW/DV/{SAFE}"), "earth-search GRD: the product folder of its measurement assets"
    assert cdse.location.startswith("s3://eodata/Sentinel-1/SAR/IW_GRDH_1S-COG/")
    assert cdse.location.endswith(f"{SAFE}_COG.SAFE")
    assert cdse.published == datetime(2021, 8, 9, 19, 2, 41, tzinfo=UTC)
    assert es.acquired_at == cdse.acquired_at


def test_slc_collection_is_a_card_input_too() -> None:
    d = _item("earthsearch_s1_grd_item.json")
    d["id"] = d["id"].replace("GRDH", "SLC_")
    d["properties"]["s1:product_uri"] = d["id"] + ".SAFE"
    d["collection"] = "sentinel-1-slc"
    rec = normalise(d, "sentinel-1-slc", "updated")
    assert isinstance(rec, SceneRecord) and rec.card == "slc" and rec.is_card_input
    assert rec.key == "S1A_IW_SLC_R059_20210809T173953"


def test_relative_orbit_from_the_absolute_orbit_when_the_catalogue_omits_it() -> None:
    # S1A absolute orbit 39156 → relative 59 (as the recorded item states).
    assert s1_input_key(SAFE, {})[2] == 59
    assert s1_input_key(SAFE, {}) == s1_input_key(SAFE + "_COG.SAFE", {"sat:relative_orbit": "59"})
    # S1B, offset 27: absolute 28179 → (28179 - 27) % 175 + 1 = 153.
    assert s1_input_key("S1B_IW_GRDH_1SDV_20210810T044826_20210810T044859_028179_035C9B_6C5A", {})[2] == 153


def test_a_reprocessed_product_keeps_the_key_another_acquisition_does_not() -> None:
    other_uid = SAFE[:-4] + "A1B2"
    assert s1_input_key(other_uid, {})[0] == s1_input_key(SAFE, {})[0]
    later = SAFE.replace("20210809T173953_20210809T174018", "20210809T174018_20210809T174043")
    assert s1_input_key(later, {})[0] != s1_input_key(SAFE, {})[0]


@pytest.mark.parametrize("bad_name", ["S1A_IW_OCN__2SDV_20210809T173953", "not-a-product"])
def test_an_unreadable_s1_name_is_a_rejection(bad_name: str) -> None:
    d = _item("earthsearch_s1_grd_item.json")
    d["id"] = bad_name
    del d["properties"]["s1:product_uri"]
    cand = normalise(d, "sentinel-1-grd", "updated")
    assert isinstance(cand, Rejected) and "not a Sentinel-1 GRD/SLC product name" in cand.reason


def test_odata_grd_product_is_a_card_input() -> None:
    p: dict[str, Any] = json.loads((DATA / "odata_product.json").read_text())
    p["Name"] = SAFE + "_COG.SAFE"
    p["S3Path"] = f"/eodata/Sentinel-1/SAR/IW_GRDH_1S-COG/2021/08/09/{SAFE}_COG.SAFE"
    p["ContentDate"] = {"Start": "2021-08-09T17:39:53.153Z", "End": "2021-08-09T17:40:18.152Z"}
    rec = odata_record(p, "SENTINEL-1/IW_GRDH_1S-COG")
    assert rec.card == "grd" and rec.is_card_input
    assert rec.key == "S1A_IW_GRDH_R059_20210809T173953"
    assert rec.product_id == SAFE + "_COG" and rec.product_name == SAFE
    assert rec.location == f"s3://eodata/Sentinel-1/SAR/IW_GRDH_1S-COG/2021/08/09/{SAFE}_COG.SAFE"
    slc = odata_record({**p, "Name": SAFE.replace("GRDH", "SLC_") + ".SAFE"}, "SENTINEL-1/IW_SLC__1S")
    assert slc.card == "slc" and slc.key == "S1A_IW_SLC_R059_20210809T173953"
