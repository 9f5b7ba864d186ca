"""Data identity of catalogue products, per-item normalisation and source settings (no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pystac
import pytest
import requests

from catalog_watcher.http import retry_after_s
from catalog_watcher.sources import normalise
from catalog_watcher.stac import Rejected, SceneRecord, acquisition_key, to_record
from cbmflow.settings import WatchSettings

DATA = Path(__file__).resolve().parents[1] / "data" / "watch"


def _earthsearch() -> dict[str, object]:
    d: dict[str, object] = json.loads((DATA / "earthsearch_s2_l2a_item.json").read_text())
    return d


def test_one_acquisition_one_key_whatever_the_baseline_or_catalogue() -> None:
    from datetime import UTC, datetime

    when = datetime(2023, 9, 12, 13, 38, 39, tzinfo=UTC)
    old = acquisition_key("S2B_MSIL2A_20230912T133839_N0509_R124_T22MHD_20230912T174059", "s2", "S2B", when, {})
    new = acquisition_key("S2B_MSIL2A_20230912T133839_N0511_R124_T22MHD_20240102T101010", "s2", "S2B", when, {})
    cdse_v1 = acquisition_key("S2B_MSIL2A_20230912T133839_N0511_R124_T22MHD", "s2", "S2B", when, {})
    other_tile = acquisition_key("S2B_MSIL2A_20230912T133839_N0509_R124_T22MHE_20230912T174059", "s2", "S2B", when, {})
    assert old[0] == new[0] == cdse_v1[0] == "S2B_MSIL2A_20230912T133839_R124_T22MHD"
    assert (old[1], new[1]) == (509, 511)
    assert other_tile[0] != old[0]


def test_recorded_earthsearch_item_normalises_to_its_safe_identity() -> None:
    rec = normalise(_earthsearch(), "sentinel-2-l2a", "updated")
    assert isinstance(rec, SceneRecord)
    assert rec.product_id == "S2B_22MHD_20230912_0_L2A"
    assert rec.product_name == "S2B_MSIL2A_20230912T133839_N0509_R124_T22MHD_20230912T174059"
    assert rec.key == "S2B_MSIL2A_20230912T133839_R124_T22MHD" and rec.baseline == 509
    # No .SAFE: the product is the Item itself (per-band COGs), read from its own href.
    assert (
        rec.location
        == "https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a/items/S2B_22MHD_20230912_0_L2A"
    )
    assert rec.published is not None and rec.published.isoformat().startswith("2023-09-12T23:04:12")


def test_cdse_item_location_is_the_safe_root() -> None:
    item = pystac.Item.from_dict(json.loads((DATA / "cdse_s2_l2a_item.json").read_text()))
    rec = to_record(item)
    assert rec.location == (
        "s3://eodata/Sentinel-2/MSI/L2A/2024/05/12/S2B_MSIL2A_20240512T102021_N0510_R065_T32UPU_20240512T132211.SAFE"
    )
    assert rec.baseline == 510


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("geometry"), ""),
        (lambda d: d["properties"].pop("datetime"), ""),
        (lambda d: d.update(assets={}), "no product asset"),
        (lambda d: d.update(collection="landsat-c2-l2"), "unsupported collection"),
        (lambda d: d.update(geometry={"type": "Polygon", "coordinates": "nonsense"}), ""),
    ],
)
def test_a_malformed_item_is_a_rejection_never_an_exception(mutate: object, reason: str) -> None:
    d = _earthsearch()
    mutate(d)  # type: ignore[operator]
    out = normalise(d, "sentinel-2-l2a", "updated")
    assert isinstance(out, Rejected), out
    assert out.item_id == "S2B_22MHD_20230912_0_L2A" and reason in out.reason


def test_retry_after_in_seconds_and_as_http_date() -> None:
    r = requests.Response()
    r.headers["Retry-After"] = "7"
    assert retry_after_s(r) == 7.0
    r.headers["Retry-After"] = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_s(r) == 0.0  # in the past: retry now
    r.headers["Retry-After"] = "soon"
    assert retry_after_s(r) is None


def test_sources_from_json_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CBMFLOW_WATCH_SOURCES",
        json.dumps(
            [
                {
                    "name": "cdse",
                    "kind": "odata",
                    "url": "https://catalogue.dataspace.copernicus.eu/odata/v1",
                    "collections": ["SENTINEL-2/S2MSI2A"],
                    "rate_per_s": 2,
                },
                {
                    "name": "earthsearch",
                    "url": "https://earth-search.aws.element84.com/v1",
                    "collections": ["sentinel-2-c1-l2a"],
                    "cursor_property": "updated",
                },
            ]
        ),
    )
    monkeypatch.delenv("CBMFLOW_WATCH_CATALOG_URL", raising=False)
    sources = WatchSettings().all_sources()
    assert [(s.name, s.kind, s.rate_per_s) for s in sources] == [("cdse", "odata", 2.0), ("earthsearch", "stac", 4.0)]
    with_static = WatchSettings(catalog_url="/data/world/stac/catalog.json").all_sources()
    assert (with_static[0].name, with_static[0].kind) == ("default", "static")
