"""Parcel and AOI import against a real PostGIS: every supported format, per-feature rejection,
stable pids across re-imports, reprojection into an existing dataset, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import psycopg2
import pytest
from psycopg2 import sql
from shapely.geometry import MultiPolygon, Point, Polygon, box
from typer.testing import CliRunner

from cbmflow import db
from cbmflow.errors import InvalidInputError
from cbmflow.parcels.cli import aoi_app, parcels_app
from cbmflow.parcels.ingest import ImportReport, add_aoi, import_parcels

X0, Y0 = 4_321_000.0, 3_210_000.0  # EPSG:3035 near Kassel


def _hole() -> Polygon:
    outer = box(X0 + 800, Y0, X0 + 900, Y0 + 100)
    inner = box(X0 + 820, Y0 + 20, X0 + 840, Y0 + 40)
    return Polygon(outer.exterior.coords, [inner.exterior.coords])


BOWTIE = Polygon([(X0 + 200, Y0), (X0 + 300, Y0 + 100), (X0 + 300, Y0), (X0 + 200, Y0 + 100)])

# (parcel_id, crop_code, crop_name, geometry, expected rejection fragment or None)
FEATURES: list[tuple[str | None, str | None, str | None, object, str | None]] = [
    ("a", "111", "wheat", box(X0, Y0, X0 + 100, Y0 + 200), None),
    ("bowtie", "112", "maize", BOWTIE, "Self-intersection"),
    ("empty", None, None, Polygon(), "geometry"),  # GDAL may store it as empty or as NULL
    ("point", "1", "x", Point(X0, Y0), "geometry type Point is not polygonal"),
    ("dup", "2", "x", box(X0 + 400, Y0, X0 + 500, Y0 + 100), "duplicate parcel id 'dup'"),
    ("dup", "2", "x", box(X0 + 600, Y0, X0 + 700, Y0 + 100), "duplicate parcel id 'dup'"),
    ("hole", "3", "rye", _hole(), None),
    (
        "multi",
        "4",
        "oats",
        MultiPolygon([box(X0 + 1000, Y0, X0 + 1100, Y0 + 100), box(X0 + 1200, Y0, X0 + 1300, Y0 + 100)]),
        None,
    ),
    (None, "5", "x", box(X0 + 1400, Y0, X0 + 1500, Y0 + 100), "missing parcel id"),
    ("b", "6", "barley", box(X0 + 1600, Y0, X0 + 1650, Y0 + 100), None),
]
ACCEPTED = {"a": 20_000.0, "hole": 9_600.0, "multi": 20_000.0, "b": 5_000.0}


def _frame(
    rows: list[tuple[str | None, str | None, str | None, object, str | None]], crs: int = 3035
) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"parcel_id": [r[0] for r in rows], "crop_code": [r[1] for r in rows], "crop_name": [r[2] for r in rows]},
        geometry=[r[3] for r in rows],
        crs=crs,
    )


def _parcels(dsn: str, aoi: str = "ms", year: int = 2024) -> dict[str, tuple[int, str | None, float, str, int]]:
    """parcel_id -> (pid, crop_code, area m², geometry type, srid)."""
    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, aoi, year)
        assert ds is not None
        cur.execute(
            sql.SQL(
                "SELECT parcel_id, pid, crop_code, ST_Area(geom), GeometryType(geom), ST_SRID(geom) FROM {}"
            ).format(ds.parcels)
        )
        return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in cur.fetchall()}


def _version(dsn: str, aoi: str = "ms", year: int = 2024) -> int:
    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, aoi, year)
        assert ds is not None
        return ds.parcels_version


def _import(dsn: str, path: Path, aoi: str = "ms", year: int = 2024, **kwargs: object) -> ImportReport:
    with db.transaction(dsn) as cur:
        return import_parcels(cur, path, aoi, year, **kwargs)  # type: ignore[arg-type]


def test_gpkg_rejects_per_feature_and_imports_the_rest(pg_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "parcels.gpkg"
    _frame(FEATURES).to_file(path)
    report = _import(pg_dsn, path, aoi="MS")  # the name is case-insensitive

    assert (report.imported, report.updated, report.unchanged, report.srid) == (4, 0, 0, 3035)
    expected = {i: frag for i, (*_, frag) in enumerate(FEATURES) if frag is not None}
    assert {r[0] for r in report.rejected} == set(expected)
    for index, parcel_id, reason in report.rejected:
        assert expected[index] in reason, (index, reason)
        assert parcel_id == FEATURES[index][0]
    assert "[" in next(r[2] for r in report.rejected if r[1] == "bowtie"), "is_valid_reason gives the location"

    stored = _parcels(pg_dsn)
    assert set(stored) == set(ACCEPTED)
    for parcel_id, area_m2 in ACCEPTED.items():
        pid, _, area, gtype, srid = stored[parcel_id]
        assert gtype == "MULTIPOLYGON" and srid == 3035
        assert area == pytest.approx(area_m2, rel=1e-9)
    assert sorted(v[0] for v in stored.values()) == [1, 2, 3, 4]
    assert stored["a"][0] < stored["hole"][0] < stored["multi"][0] < stored["b"][0], "new pids follow file order"
    assert _version(pg_dsn) == 1

    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT ST_NumInteriorRings(ST_GeometryN(geom, 1)) FROM ms.parcels_2024 WHERE parcel_id = 'hole'")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT ST_NumGeometries(geom) FROM ms.parcels_2024 WHERE parcel_id = 'multi'")
        assert cur.fetchone() == (2,)
        # the AOI was derived from the accepted parcels and contains every one of them
        cur.execute(
            "SELECT GeometryType(a.geom), ST_SRID(a.geom), bool_and(ST_Contains(a.geom, ST_Transform(p.geom, 4326)))"
            " FROM aois a, ms.parcels_2024 p WHERE a.name = 'ms' GROUP BY a.geom"
        )
        assert cur.fetchone() == ("MULTIPOLYGON", 4326, True)


def test_reimport_keeps_pids_updates_changes_and_bumps_version(pg_dsn: str, tmp_path: Path) -> None:
    first = [f for f in FEATURES if f[4] is None]
    _frame(first).to_file(tmp_path / "v1.gpkg")
    _import(pg_dsn, tmp_path / "v1.gpkg")
    before = _parcels(pg_dsn)
    assert _version(pg_dsn) == 1

    # Shapefile this time: same ids, one crop changed, one geometry changed, two new parcels.
    second = [
        ("a", "999", "wheat", box(X0, Y0, X0 + 100, Y0 + 200), None),
        ("hole", "3", "rye", _hole(), None),
        ("multi", "4", "oats", box(X0 + 1000, Y0, X0 + 1100, Y0 + 50), None),
        ("b", "6", "barley", box(X0 + 1600, Y0, X0 + 1650, Y0 + 100), None),
        ("new2", "7", "peas", box(X0 + 2000, Y0, X0 + 2100, Y0 + 100), None),
        ("new1", "8", "beans", box(X0 + 2200, Y0, X0 + 2300, Y0 + 100), None),
    ]
    _frame(second).to_file(tmp_path / "v2.shp")
    report = _import(pg_dsn, tmp_path / "v2.shp")
    assert (report.imported, report.updated, report.unchanged, report.rejected) == (2, 2, 2, [])
    after = _parcels(pg_dsn)
    for parcel_id in before:
        assert after[parcel_id][0] == before[parcel_id][0], f"pid of {parcel_id} changed"
    assert after["a"][1] == "999"
    assert after["multi"][2] == pytest.approx(5_000.0)
    assert (after["new2"][0], after["new1"][0]) == (5, 6)
    assert _version(pg_dsn) == 2

    again = _import(pg_dsn, tmp_path / "v2.shp")
    assert (again.imported, again.updated, again.unchanged) == (0, 0, 6)
    assert _version(pg_dsn) == 2, "an import that changed nothing must not invalidate the workers' index cache"


def test_geojson_in_4326_is_reprojected_into_the_existing_dataset(pg_dsn: str, tmp_path: Path) -> None:
    _frame([f for f in FEATURES if f[4] is None]).to_file(tmp_path / "base.gpkg")
    _import(pg_dsn, tmp_path / "base.gpkg")

    truth = _frame(
        [
            ("g1", "10", "hops", box(X0 + 3000, Y0 + 500, X0 + 3137.5, Y0 + 611.25), None),
            ("g2", "11", "vines", _hole(), None),
            ("bad", "12", "x", BOWTIE, "Self-intersection"),
        ]
    )
    truth.to_crs(4326).to_file(tmp_path / "wgs84.geojson", driver="GeoJSON")
    report = _import(pg_dsn, tmp_path / "wgs84.geojson")
    assert report.srid == 3035
    assert (report.imported, report.updated, report.unchanged) == (2, 0, 0)
    assert [r[1] for r in report.rejected] == ["bad"] and "Self-intersection" in report.rejected[0][2]

    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT parcel_id, ST_Area(geom), ST_X(ST_Centroid(geom)), ST_Y(ST_Centroid(geom)), ST_SRID(geom)"
            " FROM ms.parcels_2024 WHERE parcel_id IN ('g1', 'g2') ORDER BY parcel_id"
        )
        rows = cur.fetchall()
    for (parcel_id, area, cx, cy, srid), geom in zip(rows, truth.geometry[:2], strict=True):
        assert srid == 3035, parcel_id
        assert area == pytest.approx(geom.area, rel=1e-6)
        assert abs(cx - geom.centroid.x) < 1e-3 and abs(cy - geom.centroid.y) < 1e-3


def test_geoparquet_and_custom_columns(pg_dsn: str, tmp_path: Path) -> None:
    frame = gpd.GeoDataFrame(
        {
            "PARCEL_NO": [101, 102, 103],  # integer ids become text ids
            "KULTUR": ["A1", "B2", None],
            "KULTUR_NAME": ["Mais", "Weizen", None],
        },
        geometry=[
            box(X0, Y0, X0 + 10, Y0 + 10),
            box(X0 + 20, Y0, X0 + 30, Y0 + 10),
            box(X0 + 40, Y0, X0 + 50, Y0 + 10),
        ],
        crs=3035,
    )
    frame.to_parquet(tmp_path / "parcels.parquet")
    with pytest.raises(InvalidInputError, match="no parcel id column"):
        _import(pg_dsn, tmp_path / "parcels.parquet")
    report = _import(
        pg_dsn,
        tmp_path / "parcels.parquet",
        id_column="parcel_no",  # case-insensitive
        crop_code_column="KULTUR",
        crop_name_column="KULTUR_NAME",
    )
    assert (report.imported, report.rejected) == (3, [])
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT pid, parcel_id, crop_code, crop_name FROM ms.parcels_2024 ORDER BY pid")
        assert cur.fetchall() == [(1, "101", "A1", "Mais"), (2, "102", "B2", "Weizen"), (3, "103", None, None)]


def test_geographic_file_for_a_new_dataset_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    _frame([FEATURES[0]]).to_crs(4326).to_file(tmp_path / "wgs84.geojson", driver="GeoJSON")
    with pytest.raises(InvalidInputError, match="projected"):
        _import(pg_dsn, tmp_path / "wgs84.geojson")
    with db.transaction(pg_dsn) as cur:
        assert db.list_datasets(cur) == []
        cur.execute("SELECT count(*) FROM aois")
        assert cur.fetchone() == (0,)
    report = _import(pg_dsn, tmp_path / "wgs84.geojson", srid=3035)
    assert report.srid == 3035 and report.imported == 1
    assert _parcels(pg_dsn)["a"][2] == pytest.approx(20_000.0, rel=1e-6)


def test_import_is_part_of_the_callers_transaction(pg_dsn: str, tmp_path: Path) -> None:
    _frame([FEATURES[0]]).to_file(tmp_path / "one.gpkg")
    conn = db.connect(pg_dsn)
    try:
        with conn.cursor() as cur:
            assert import_parcels(cur, tmp_path / "one.gpkg", "ms", 2024).imported == 1
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM datasets")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()


def test_bad_names_and_files(pg_dsn: str, tmp_path: Path) -> None:
    _frame([FEATURES[0]]).to_file(tmp_path / "one.gpkg")
    for bad in ("1ms", "m-s", "", "x" * 40):
        with pytest.raises(InvalidInputError, match="must match"):
            _import(pg_dsn, tmp_path / "one.gpkg", aoi=bad)
    for reserved in ("public", "PG_TEMP", "topology"):
        with pytest.raises(InvalidInputError, match="reserved"):
            _import(pg_dsn, tmp_path / "one.gpkg", aoi=reserved)
    with pytest.raises(InvalidInputError, match="no such file"):
        _import(pg_dsn, tmp_path / "missing.gpkg")
    two = tmp_path / "two.gpkg"
    _frame([FEATURES[0]]).to_file(two, layer="l1")
    _frame([FEATURES[6]]).to_file(two, layer="l2")
    with pytest.raises(InvalidInputError, match="choose one with --layer"):
        _import(pg_dsn, two)
    assert _import(pg_dsn, two, layer="l2").imported == 1


def test_add_aoi_upserts_a_multipolygon_in_4326(pg_dsn: str, tmp_path: Path) -> None:
    gpd.GeoDataFrame(geometry=[box(9.0, 51.0, 10.0, 52.0)], crs=4326).to_file(
        tmp_path / "aoi.geojson", driver="GeoJSON"
    )
    gpd.GeoDataFrame(
        geometry=[box(X0, Y0, X0 + 5000, Y0 + 5000), box(X0 + 10_000, Y0, X0 + 12_000, Y0 + 2000)], crs=3035
    ).to_file(tmp_path / "aoi.gpkg")
    with db.transaction(pg_dsn) as cur:
        west, south, east, north = add_aoi(cur, "DE", tmp_path / "aoi.geojson")
        assert (west, south, east, north) == pytest.approx((9.0, 51.0, 10.0, 52.0))
        cur.execute("SELECT GeometryType(geom), ST_SRID(geom), ST_NumGeometries(geom) FROM aois WHERE name = 'de'")
        assert cur.fetchone() == ("MULTIPOLYGON", 4326, 1)
    with db.transaction(pg_dsn) as cur:
        add_aoi(cur, "de", tmp_path / "aoi.gpkg")
        cur.execute("SELECT ST_NumGeometries(geom), ST_XMin(geom) > 9.9 FROM aois WHERE name = 'de'")
        assert cur.fetchone() == (2, True), "re-adding replaces the outline"
    # an existing AOI is used as is by an import, not re-derived from the parcels
    _frame([FEATURES[0]]).to_file(tmp_path / "one.gpkg")
    _import(pg_dsn, tmp_path / "one.gpkg", aoi="de")
    with db.transaction(pg_dsn) as cur:
        cur.execute("SELECT ST_NumGeometries(geom) FROM aois WHERE name = 'de'")
        assert cur.fetchone() == (2,)
    gpd.GeoDataFrame(geometry=[Point(9.5, 51.5)], crs=4326).to_file(tmp_path / "pt.geojson", driver="GeoJSON")
    with db.transaction(pg_dsn) as cur, pytest.raises(InvalidInputError, match="polygons"):
        add_aoi(cur, "pt", tmp_path / "pt.geojson")


def test_cli_exit_codes_and_listings(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBMFLOW_DB_DSN", pg_dsn)
    runner = CliRunner()
    _frame(FEATURES).to_file(tmp_path / "mixed.gpkg")
    result = runner.invoke(parcels_app, ["import", str(tmp_path / "mixed.gpkg"), "--dataset", "MS", "--year", "2024"])
    assert result.exit_code == 0, result.output
    assert "Self-intersection" in result.output and "duplicate parcel id" in result.output

    _frame([f for f in FEATURES if f[4] is not None and f[3] is not None]).to_file(tmp_path / "bad.gpkg")
    result = runner.invoke(parcels_app, ["import", str(tmp_path / "bad.gpkg"), "--dataset", "ms", "--year", "2024"])
    assert result.exit_code == 1, result.output

    result = runner.invoke(parcels_app, ["import", str(tmp_path / "bad.gpkg"), "--dataset", "9x", "--year", "2024"])
    assert result.exit_code == 2

    result = runner.invoke(parcels_app, ["list"])
    assert result.exit_code == 0 and "ms" in result.output, result.output
    result = runner.invoke(parcels_app, ["list", "--dataset", "ms", "--year", "2024"])
    assert result.exit_code == 0 and "wheat" in result.output, result.output

    gpd.GeoDataFrame(geometry=[box(9.0, 51.0, 10.0, 52.0)], crs=4326).to_file(
        tmp_path / "aoi.geojson", driver="GeoJSON"
    )
    result = runner.invoke(aoi_app, ["add", "de", str(tmp_path / "aoi.geojson")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(aoi_app, ["list"])
    assert result.exit_code == 0 and "de" in result.output and "ms" in result.output, result.output


def test_concurrent_imports_never_hand_out_a_pid_twice(pg_dsn: str, tmp_path: Path) -> None:
    _frame([FEATURES[0]]).to_file(tmp_path / "one.gpkg")
    _import(pg_dsn, tmp_path / "one.gpkg")
    _frame([("x1", None, None, box(X0, Y0, X0 + 1, Y0 + 1), None)]).to_file(tmp_path / "x1.gpkg")
    _frame([("x2", None, None, box(X0, Y0, X0 + 1, Y0 + 1), None)]).to_file(tmp_path / "x2.gpkg")
    first, second = db.connect(pg_dsn), db.connect(pg_dsn)
    try:
        with first.cursor() as cur:
            import_parcels(cur, tmp_path / "x1.gpkg", "ms", 2024)
        # the second import waits for the first one's dataset lock; it must not block forever here
        second.autocommit = False
        with second.cursor() as cur:
            cur.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg2.errors.LockNotAvailable):
                import_parcels(cur, tmp_path / "x2.gpkg", "ms", 2024)
        second.rollback()
        first.commit()
        with second.cursor() as cur:
            import_parcels(cur, tmp_path / "x2.gpkg", "ms", 2024)
        second.commit()
    finally:
        first.close()
        second.close()
    assert {k: v[0] for k, v in _parcels(pg_dsn).items()} == {"a": 1, "x1": 2, "x2": 3}


def _gist_indexes(dsn: str, aoi: str = "ms", year: int = 2024) -> list[str]:
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s AND indexdef ILIKE %s",
            (aoi, f"parcels_{year}", "%USING gist (geom)%"),
        )
        return [str(r[0]) for r in cur.fetchall()]


def test_first_import_builds_the_spatial_index_after_the_rows(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into an empty table the GiST index is dropped and rebuilt once; it must exist (once) after
    the first import and after a later one into the filled table, and batches keep the file order."""
    import cbmflow.parcels.ingest as ingest

    monkeypatch.setattr(ingest, "COPY_BATCH_ROWS", 3)  # several COPY batches, each with its own WKB
    first = [f for f in FEATURES if f[4] is None]
    _frame(first).to_file(tmp_path / "v1.gpkg")
    report = _import(pg_dsn, tmp_path / "v1.gpkg")
    assert "index" in report.timings_s and report.timings_s["upsert"] >= 0
    assert len(_gist_indexes(pg_dsn)) == 1
    stored = _parcels(pg_dsn)
    assert [parcel_id for parcel_id, _ in sorted(stored.items(), key=lambda kv: kv[1][0])] == [f[0] for f in first]
    for parcel_id, code, _, geom, _ in first:  # each row got its own geometry across the batches
        assert parcel_id is not None and stored[parcel_id][1] == code
        assert stored[parcel_id][2] == pytest.approx(geom.area, rel=1e-9)  # type: ignore[attr-defined]
    with db.transaction(pg_dsn) as cur:  # the index answers a bounding-box query like the worker's
        cur.execute("SET LOCAL enable_seqscan = off")
        cur.execute(
            "EXPLAIN SELECT pid FROM ms.parcels_2024 WHERE geom && ST_MakeEnvelope(%s, %s, %s, %s, 3035)",
            (X0, Y0, X0 + 10, Y0 + 10),
        )
        assert "parcels_2024_geom_gix" in " ".join(str(r[0]) for r in cur.fetchall())

    more = [("late", "9", "rye", box(X0 + 5000, Y0, X0 + 5100, Y0 + 100), None)]
    _frame(more).to_file(tmp_path / "v2.gpkg")
    again = _import(pg_dsn, tmp_path / "v2.gpkg")
    assert again.imported == 1 and "index" not in again.timings_s  # a filled table keeps its index
    assert len(_gist_indexes(pg_dsn)) == 1


@pytest.mark.parametrize("suffix", ["gpkg", "parquet"])
def test_batches_reject_and_number_exactly_as_one_read(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """The file is read in batches: a duplicate id split across two batches (features 4 | 5 with
    batches of 5) still rejects both copies, and indexes, pids and the AOI are those of one read."""
    import cbmflow.parcels.ingest as ingest

    path = tmp_path / f"parcels.{suffix}"
    frame = _frame(FEATURES)
    if suffix == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_file(path)
    whole = _import(pg_dsn, path, aoi="whole")
    monkeypatch.setattr(ingest, "COPY_BATCH_ROWS", 5)
    batched = _import(pg_dsn, path, aoi="batched")
    assert batched.rejected == whole.rejected
    assert [r[2] for r in batched.rejected if r[1] == "dup"] == ["duplicate parcel id 'dup' (features 4, 5)"] * 2
    assert (batched.imported, batched.updated, batched.unchanged) == (whole.imported, 0, 0) == (4, 0, 0)
    assert {k: v[:3] for k, v in _parcels(pg_dsn, "batched").items()} == {
        k: v[:3] for k, v in _parcels(pg_dsn, "whole").items()
    }
    with db.transaction(pg_dsn) as cur:
        cur.execute(
            "SELECT ST_Equals(a.geom, b.geom) FROM aois a, aois b WHERE a.name = 'whole' AND b.name = 'batched'"
        )
        assert cur.fetchone() == (True,)


def test_geoparquet_geometry_it_cannot_decode_is_one_rejection(pg_dsn: str, tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    good = shapely.to_wkb(box(X0, Y0, X0 + 10, Y0 + 10))
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}}}  # fmt: skip
    table = pa.table({"parcel_id": ["ok", "bad"], "geometry": pa.array([good, b"\x01\x02junk"], pa.binary())})
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo).encode()}), tmp_path / "x.parquet")
    with pytest.raises(InvalidInputError, match="no CRS"):  # an explicit null CRS is an unknown one
        _import(pg_dsn, tmp_path / "x.parquet")
    geo["columns"]["geometry"]["crs"] = pyproj_json(3035)
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo).encode()}), tmp_path / "x.parquet")
    report = _import(pg_dsn, tmp_path / "x.parquet")
    assert report.imported == 1
    assert report.rejected == [(1, "bad", "unreadable geometry (not WKB)")]


def pyproj_json(epsg: int) -> object:
    import pyproj

    return pyproj.CRS.from_epsg(epsg).to_json_dict()
