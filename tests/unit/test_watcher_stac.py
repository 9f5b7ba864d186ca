"""STAC normalisation at the boundary: static catalogues and item → SceneRecord."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pystac
import pytest
import shapely.geometry

from catalog_watcher.stac import iter_scenes, to_record
from cbmflow.errors import InvalidInputError


def _item(item_id: str, x0: float, when: datetime, collection: str = "sentinel-2-l2a") -> pystac.Item:
    geom = shapely.geometry.box(x0, 48.0, x0 + 1.0, 49.0)
    item = pystac.Item(item_id, shapely.geometry.mapping(geom), list(geom.bounds), when, {"updated": "u1"})
    item.collection_id = collection
    item.add_asset("product", pystac.Asset(f"../../products/{item_id}.SAFE", roles=["data"]))
    return item


def test_to_record_parses_product_name_and_location(tmp_path: Path) -> None:
    name = "S2B_MSIL2A_20240512T102021_N0510_R065_T32UPU_20240512T132211"
    item = _item(name, 11.0, datetime(2024, 5, 12, 10, 20, 21, tzinfo=UTC))
    item.set_self_href(str(tmp_path / "stac" / name / f"{name}.json"))
    rec = to_record(item)
    assert (rec.product_id, rec.mission, rec.sensor, rec.card) == (name, "S2B", "MSIL2A", "s2")
    assert rec.location == str((tmp_path / "products" / f"{name}.SAFE").resolve())
    assert rec.acquired_at == datetime(2024, 5, 12, 10, 20, 21, tzinfo=UTC)
    assert rec.updated == "u1"


def test_unsupported_collection_is_a_clear_error() -> None:
    item = _item("S2B_X", 11.0, datetime(2024, 5, 1, tzinfo=UTC), collection="landsat-c2-l2")
    with pytest.raises(InvalidInputError, match="unsupported collection"):
        to_record(item)


def test_static_catalogue_filters_by_aoi_and_lookback(tmp_path: Path) -> None:
    cat = pystac.Catalog("root", "test")
    coll = pystac.Collection(
        "sentinel-2-l2a",
        "s2",
        pystac.Extent(pystac.SpatialExtent([[0, 0, 20, 60]]), pystac.TemporalExtent([[None, None]])),
    )
    cat.add_child(coll)
    coll.add_item(_item("S2B_MSIL2A_A", 11.0, datetime(2024, 5, 1, tzinfo=UTC)))
    coll.add_item(_item("S2B_MSIL2A_B", 15.0, datetime(2024, 5, 2, tzinfo=UTC)))  # outside the AOI
    coll.add_item(_item("S2B_MSIL2A_C", 11.0, datetime(2023, 5, 2, tzinfo=UTC)))  # too old
    cat.normalize_hrefs(str(tmp_path / "stac"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    aoi = shapely.geometry.box(11.2, 48.2, 11.4, 48.4)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    ids = [
        r.product_id for r in iter_scenes(str(tmp_path / "stac" / "catalog.json"), ["sentinel-2-l2a"], aoi, 90, now=now)
    ]
    assert ids == ["S2B_MSIL2A_A"]
    ids = [r.product_id for r in iter_scenes(str(tmp_path / "stac" / "catalog.json"), [], aoi, 0, now=now)]
    assert sorted(ids) == ["S2B_MSIL2A_A", "S2B_MSIL2A_C"]
