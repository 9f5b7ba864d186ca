"""The extraction engine against an independent one: JRC's reference, rasterstats.zonal_stats.

Every raster is built in code with an explicit axis order (arrays are ``[y, x]``: row 0 is the
northern edge, column 0 the western one) on a southern-hemisphere UTM grid (EPSG:32735, northings
around 8,000,000, as on a Sentinel-2 tile), written to a GeoTIFF, and read back by rasterstats
from the file, so that both engines see the same bytes and nothing of ours sits in the reference.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterstats import zonal_stats
from shapely.geometry import MultiPolygon, Polygon, box

from card.geobox import GeoBox
from worker import engine

CRS = "EPSG:32735"
RES = 10.0
X0, Y0 = 399960.0, 8000020.0  # north-west corner
HEIGHT, WIDTH = 120, 160  # rows (y), columns (x)
TRANSFORM = Affine(RES, 0.0, X0, 0.0, -RES, Y0)
GRID = GeoBox((HEIGHT, WIDTH), TRANSFORM, CRS)
STATS = "count mean std min max percentile_25 percentile_50 percentile_75"
FIELDS = {
    "mean": "mean",
    "std": "std",
    "min": "min",
    "max": "max",
    "p25": "percentile_25",
    "p50": "percentile_50",
    "p75": "percentile_75",
}


def xy(col: float, row: float) -> tuple[float, float]:
    """Map coordinates of a point given in (fractional) pixel units from the north-west corner."""
    return X0 + col * RES, Y0 - row * RES


def pbox(c0: float, r0: float, c1: float, r1: float) -> Polygon:
    """A rectangle given in pixel units (column range, row range)."""
    (x0, y0), (x1, y1) = xy(c0, r0), xy(c1, r1)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def write_tif(path: Path, data: np.ndarray[Any, Any], nodata: float | None = None) -> Path:
    assert data.shape == (HEIGHT, WIDTH)  # [y, x]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=HEIGHT,
        width=WIDTH,
        count=1,
        dtype=data.dtype,
        crs=CRS,
        transform=TRANSFORM,
        nodata=nodata,
    ) as dst:
        dst.write(data, 1)
    return path


def reference(geoms: list[Any], path: Path, nodata: float | None, **kw: Any) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterstats' own deprecation and nodata notices
        return list(zonal_stats(geoms, str(path), all_touched=False, nodata=nodata, stats=STATS, **kw))


def assert_matches(ours: engine.BandStats, pids: np.ndarray[Any, Any], ref: list[dict[str, Any]], rtol: float) -> None:
    expected = {int(p): r for p, r in zip(pids, ref, strict=True) if r["count"]}
    assert sorted(expected) == sorted(ours.pid.tolist()), "parcels with valid pixels differ"
    assert len(set(ours.pid.tolist())) == len(ours.pid)
    rows = [expected[int(p)] for p in ours.pid]
    np.testing.assert_array_equal(ours.count, [r["count"] for r in rows])
    for ours_name, ref_name in FIELDS.items():
        np.testing.assert_allclose(
            getattr(ours, ours_name), [r[ref_name] for r in rows], rtol=rtol, atol=1e-9, err_msg=ours_name
        )


def square(c: float, r: float, half: float) -> Polygon:
    return pbox(c - half, r - half, c + half, r + half)


def mixed_parcels() -> list[Any]:
    """Every geometry case the engine must get right, in one parcel set."""
    donut = Polygon(
        [xy(10, 10), xy(40, 10), xy(40, 40), xy(10, 40)],
        [[xy(20, 20), xy(30, 20), xy(30, 30), xy(20, 30)]],
    )
    return [
        donut,  # polygon with a hole
        MultiPolygon([pbox(45.3, 5.2, 55.7, 15.1), pbox(60.2, 8.4, 70.9, 20.6)]),  # two parts
        Polygon([xy(80.1, 10.3), xy(110.7, 14.2), xy(95.5, 40.8)]),  # triangle
        Polygon([xy(90.2, 20.1), xy(120.4, 22.7), xy(115.9, 50.3), xy(85.6, 45.2)]),  # overlaps the triangle
        Polygon([xy(90.2, 20.1), xy(120.4, 22.7), xy(115.9, 50.3), xy(85.6, 45.2)]),  # the same parcel twice
        square(35.0, 35.0, 8.3),  # overlaps the donut and its hole
        MultiPolygon([square(130.0, 40.0, 6.1), square(134.0, 44.0, 6.1)]),  # parts overlap each other
        pbox(12.2, 60.0, 12.4, 90.0),  # sliver thinner than a pixel, between pixel centres: no pixel
        square(70.0, 70.0, 0.2),  # smaller than a pixel, no centre inside
        pbox(-5.3, 50.2, 6.6, 70.7),  # crosses the western edge
        pbox(140.4, -8.1, 170.2, 9.9),  # crosses the north-east corner
        pbox(-40.0, -40.0, -20.0, -20.0),  # wholly outside the grid
        pbox(60.1, 85.3, 100.8, 118.6),  # holds a nodata patch
        pbox(101.2, 60.3, 130.7, 80.9),  # wholly nodata
        Polygon([xy(20.4, 100.2), xy(50.6, 95.1), xy(40.3, 119.9), xy(22.2, 130.0)]),  # crosses the south edge
    ]


def uint16_band(rng: np.random.Generator) -> np.ndarray[Any, Any]:
    band = rng.integers(1, 12000, size=(HEIGHT, WIDTH), dtype=np.uint16)  # [y, x]
    band[95:110, 70:90] = 0  # nodata patch inside a parcel
    band[58:85, 98:135] = 0  # covers a parcel entirely
    band[:, 0] = 0  # nodata column on the western edge
    return band


def test_uint16_mixed_geometries_match_rasterstats(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    band = uint16_band(rng)
    path = write_tif(tmp_path / "b04.tif", band, nodata=0)
    geoms = mixed_parcels()
    pids = np.arange(1, len(geoms) + 1, dtype=np.int64) * 7
    index = engine.build_index(geoms, pids, GRID)
    ours = engine.band_stats(index, band, nodata=0)
    # Integer bands: rasterstats sums in int64, so the means agree to the last bit, not just 1e-6.
    assert_matches(ours, pids, reference(geoms, path, nodata=0), rtol=1e-12)
    # The sliver, the sub-pixel square, the parcel outside the grid: no pixel, so no index entry.
    # The wholly-nodata parcel: pixels but no valid value, so indexed but without statistics.
    assert set(pids.tolist()) - set(index.pids.tolist()) == {8 * 7, 9 * 7, 12 * 7}
    assert set(index.pids.tolist()) - set(ours.pid.tolist()) == {14 * 7}
    # Overlapping parcels each keep every pixel: the duplicated parcel gets exactly the same.
    dup = {int(p): i for i, p in enumerate(ours.pid)}
    for name in ("count", "mean", "std", "min", "max", "p25", "p50", "p75"):
        assert getattr(ours, name)[dup[4 * 7]] == getattr(ours, name)[dup[5 * 7]]


def test_float32_with_nan_and_nodata(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    band = rng.uniform(0.01, 0.6, size=(HEIGHT, WIDTH)).astype(np.float32)
    band[30:45, 15:60] = np.nan
    band[90:100, 60:80] = -9999.0
    band[0:5, :] = np.nan
    path = write_tif(tmp_path / "ndvi.tif", band, nodata=-9999.0)
    geoms = mixed_parcels()
    pids = np.arange(len(geoms), dtype=np.int64)
    ours = engine.band_stats(engine.build_index(geoms, pids, GRID), band, nodata=-9999.0)
    # rasterstats accumulates float32 data in float32, we in float64: they agree to ~1e-7.
    assert_matches(ours, pids, reference(geoms, path, nodata=-9999.0), rtol=1e-6)


def test_nodata_none_uses_every_pixel(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    band = rng.integers(0, 40, size=(HEIGHT, WIDTH), dtype=np.uint16)  # zeros are real values here
    # The file's nodata is what rasterstats' boundless read fills in beyond the edges.
    path = write_tif(tmp_path / "b.tif", band, nodata=65535)
    geoms = mixed_parcels()
    pids = np.arange(len(geoms), dtype=np.int64)
    ours = engine.band_stats(engine.build_index(geoms, pids, GRID), band, nodata=None)
    # rasterstats needs some nodata value; one that never occurs is the same as none.
    assert_matches(ours, pids, reference(geoms, path, nodata=65535), rtol=1e-12)


def test_negative_buffer_matches_rasterstats_on_buffered_geometries(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    band = uint16_band(rng)
    path = write_tif(tmp_path / "b08.tif", band, nodata=0)
    geoms = mixed_parcels()
    pids = np.arange(len(geoms), dtype=np.int64)
    index = engine.build_index(geoms, pids, GRID, buffer_m=-12.5)
    assert index.buffer_m == -12.5
    buffered = [g for g in shapely.buffer(np.array(geoms, dtype=object), -12.5)]
    ref = reference([g for g in buffered if not g.is_empty], path, nodata=0)
    ref_pids = pids[[not g.is_empty for g in buffered]]
    assert_matches(engine.band_stats(index, band, nodata=0), ref_pids, ref, rtol=1e-12)
    unbuffered = engine.build_index(geoms, pids, GRID)
    assert index.npixels.sum() < unbuffered.npixels.sum()


def test_offset_is_added_after_the_nodata_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    band = uint16_band(rng)
    band[40:60, 40:60] = 1000  # DN 1000 + offset -1000 = 0: valid, must not be taken for nodata
    geoms = mixed_parcels()
    pids = np.arange(len(geoms), dtype=np.int64)
    index = engine.build_index(geoms, pids, GRID)
    ours = engine.band_stats(index, band, nodata=0, offset=-1000.0)
    # Reference: rasterstats on the reflectance raster the offset defines, with NaN for raw nodata.
    shifted = np.where(band == 0, np.nan, band.astype(np.float64) - 1000.0)
    path = write_tif(tmp_path / "shifted.tif", shifted, nodata=float("nan"))
    assert_matches(ours, pids, reference(geoms, path, nodata=float("nan")), rtol=1e-12)
    plain = engine.band_stats(index, band, nodata=0)
    np.testing.assert_array_equal(plain.count, ours.count)
    np.testing.assert_allclose(plain.std, ours.std, rtol=1e-9)
    for name in ("mean", "min", "max", "p25", "p50", "p75"):
        np.testing.assert_array_equal(getattr(plain, name) - 1000.0, getattr(ours, name))


def test_wide_integer_range_and_float64_paths(tmp_path: Path) -> None:
    """Values spanning more than 16 bits leave the radix path; float64 goes through quickselect."""
    rng = np.random.default_rng(16)
    wide = rng.integers(-3_000_000, 3_000_000, size=(HEIGHT, WIDTH), dtype=np.int32)
    wide[wide % 7 == 0] = 5  # many ties
    geoms = mixed_parcels()
    pids = np.arange(len(geoms), dtype=np.int64)
    index = engine.build_index(geoms, pids, GRID)
    path = write_tif(tmp_path / "wide.tif", wide, nodata=-2_000_000_000)
    ref = reference(geoms, path, nodata=-2_000_000_000)
    assert_matches(engine.band_stats(index, wide, nodata=None), pids, ref, rtol=1e-12)
    as_f64 = wide.astype(np.float64)
    path = write_tif(tmp_path / "wide64.tif", as_f64, nodata=-2e9)
    ref = reference(geoms, path, nodata=-2e9)
    assert_matches(engine.band_stats(index, as_f64, nodata=None), pids, ref, rtol=1e-12)


def test_scl_class_histograms(tmp_path: Path) -> None:
    rng = np.random.default_rng(17)
    scl = rng.choice(np.array([0, 1, 3, 4, 5, 6, 8, 9, 10, 11], np.uint8), size=(HEIGHT, WIDTH))
    scl[60:90, 20:50] = 4  # a field of one class
    path = write_tif(tmp_path / "scl.tif", scl, nodata=0)
    geoms = mixed_parcels()
    pids = np.arange(100, 100 + len(geoms), dtype=np.int64)
    index = engine.build_index(geoms, pids, GRID)
    hist = engine.class_histograms(index, scl, nodata=0)
    assert hist.cls.dtype == np.int16 and (hist.count > 0).all()
    ours: dict[int, dict[int, int]] = {}
    for p, c, n in zip(hist.pid.tolist(), hist.cls.tolist(), hist.count.tolist(), strict=True):
        ours.setdefault(p, {})[c] = n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = list(zonal_stats(geoms, str(path), all_touched=False, nodata=0, categorical=True, raster_out=True))
    expected: dict[int, dict[int, int]] = {}
    for p, r in zip(pids.tolist(), ref, strict=True):
        # Independent of rasterstats' own counting: bincount over the parcel's unmasked pixels.
        values = r["mini_raster_array"].compressed()
        counts = np.bincount(values, minlength=256)
        by_bincount = {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
        categorical = {int(k): int(v) for k, v in r.items() if not isinstance(k, str)}
        assert by_bincount == categorical
        if by_bincount:
            expected[p] = by_bincount
    assert ours == expected
    # Rows come in index order, then class order.
    order = np.lexsort((hist.cls, np.searchsorted(index.pids, hist.pid)))
    np.testing.assert_array_equal(order, np.arange(len(hist)))


def burn_alone(geom: Any, transform: Affine, shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    return rasterio.features.rasterize([(geom, 1)], out_shape=shape, transform=transform, all_touched=False).astype(
        bool
    )


def random_polygons(rng: np.random.Generator, n: int) -> list[Any]:
    """Star-shaped polygons of all sizes (sub-pixel to tens of pixels), some across the edges."""
    out: list[Any] = []
    for _ in range(n):
        c, r = rng.uniform(-10, WIDTH + 10), rng.uniform(-10, HEIGHT + 10)
        size = float(np.exp(rng.uniform(np.log(0.3), np.log(25.0))))
        k = int(rng.integers(3, 12))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = size * rng.uniform(0.3, 1.0, k)
        ring = [xy(c + rr * np.cos(a), r + rr * np.sin(a)) for a, rr in zip(angles, radii, strict=True)]
        poly = Polygon(ring)
        if rng.random() < 0.15:  # a second part makes a MultiPolygon
            poly = MultiPolygon([poly, square(c + 2.5 * size, r, size / 3)])
        out.append(poly)
    return out


def test_window_rasterization_equals_full_grid() -> None:
    """GDAL's rule is the pixel centre, so a polygon burnt in any window gets the same pixels."""
    rng = np.random.default_rng(18)
    for geom in random_polygons(rng, 150):
        full = burn_alone(geom, TRANSFORM, (HEIGHT, WIDTH))
        minx, miny, maxx, maxy = geom.bounds
        c0, r0 = int(np.floor((minx - X0) / RES)) - 3, int(np.floor((Y0 - maxy) / RES)) - 2
        c1, r1 = int(np.ceil((maxx - X0) / RES)) + 1, int(np.ceil((Y0 - miny) / RES)) + 4
        window = burn_alone(geom, GRID.shifted(rows=r0, cols=c0).transform, (r1 - r0, c1 - c0))
        rows, cols = np.nonzero(window)
        rows, cols = rows + r0, cols + c0
        inside = (rows >= 0) & (rows < HEIGHT) & (cols >= 0) & (cols < WIDTH)
        expected = np.zeros((HEIGHT, WIDTH), bool)
        expected[rows[inside], cols[inside]] = True
        np.testing.assert_array_equal(full, expected)


def test_index_pixels_equal_each_parcel_burnt_alone() -> None:
    """Overlapping parcels: every parcel gets exactly the pixels it gets when burnt on its own."""
    rng = np.random.default_rng(19)
    geoms = random_polygons(rng, 200)
    pids = np.arange(len(geoms), dtype=np.int64) + 1000
    index = engine.build_index(geoms, pids, GRID)
    offsets, rows, cols = index.pixels()
    got = {
        int(p): set(zip(rows[a:b].tolist(), cols[a:b].tolist(), strict=True))
        for p, a, b in zip(index.pids, offsets[:-1], offsets[1:], strict=True)
    }
    for p, geom in zip(pids.tolist(), geoms, strict=True):
        r, c = np.nonzero(burn_alone(geom, TRANSFORM, (HEIGHT, WIDTH)))
        want = set(zip(r.tolist(), c.tolist(), strict=True))
        assert got.get(p, set()) == want, p
    row_off, col_off, height, width = index.window
    assert rows.min() == row_off and rows.max() == row_off + height - 1
    assert cols.min() == col_off and cols.max() == col_off + width - 1


def test_random_polygons_match_rasterstats(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    band = rng.integers(0, 3000, size=(HEIGHT, WIDTH), dtype=np.uint16)  # ~1/3000 pixels are nodata
    band[rng.random((HEIGHT, WIDTH)) < 0.05] = 0
    path = write_tif(tmp_path / "rand.tif", band, nodata=0)
    geoms = random_polygons(rng, 200)
    pids = rng.permutation(len(geoms)).astype(np.int64)
    index = engine.build_index(geoms, pids, GRID)
    assert_matches(engine.band_stats(index, band, nodata=0), pids, reference(geoms, path, nodata=0), rtol=1e-12)


def test_touching_grid_aligned_parcels(tmp_path: Path) -> None:
    """A parcel map with shared edges on pixel corners and diagonals through pixel centres.

    Shared edges are where one burn of all parcels could hand a pixel to the wrong parcel: GDAL's
    half-open rule gives a pixel on a shared edge to one side only, as rasterstats sees it.
    """
    rng = np.random.default_rng(21)
    band = rng.integers(1, 500, size=(HEIGHT, WIDTH), dtype=np.uint16)
    path = write_tif(tmp_path / "tiles.tif", band, nodata=0)
    geoms: list[Any] = []
    for r in range(0, HEIGHT, 20):
        for c in range(0, WIDTH, 20):
            # Two triangles per 20x20 block, split along the diagonal through pixel centres.
            geoms.append(Polygon([xy(c, r), xy(c + 20, r), xy(c + 20, r + 20)]))
            geoms.append(Polygon([xy(c, r), xy(c + 20, r + 20), xy(c, r + 20)]))
    pids = np.arange(len(geoms), dtype=np.int64)
    index = engine.build_index(geoms, pids, GRID)
    assert index.npixels.sum() == HEIGHT * WIDTH  # a partition: every pixel exactly once
    assert_matches(engine.band_stats(index, band, nodata=0), pids, reference(geoms, path, nodata=0), rtol=1e-12)


def test_windowed_values_and_read_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(22)
    band = uint16_band(rng)
    path = write_tif(tmp_path / "b02.tif", band, nodata=0)
    geoms = [square(50, 50, 10.5), square(80, 70, 6.2)]
    index = engine.build_index(geoms, np.array([1, 2]), GRID)
    values, offset = engine.read_window(path, index)
    row_off, col_off, height, width = index.window
    assert offset == (row_off, col_off) and values.shape == (height, width)
    windowed = engine.band_stats(index, values, window_offset=offset)
    full = engine.band_stats(index, band)
    for name in ("pid", "count", "mean", "std", "min", "max", "p25", "p50", "p75"):
        np.testing.assert_array_equal(getattr(windowed, name), getattr(full, name))
    with pytest.raises(ValueError, match="do not cover"):
        engine.band_stats(index, values[1:], window_offset=offset)
    with pytest.raises(ValueError, match="do not cover"):
        engine.class_histograms(index, band[:, :60].astype(np.uint8))


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    geoms = random_polygons(rng, 60)
    index = engine.build_index(geoms, np.arange(60), GeoBox((HEIGHT, WIDTH), TRANSFORM, 32735), buffer_m=-3.0)
    index.save(tmp_path / "index.bin")  # any name: not silently renamed to .npz
    loaded = engine.ParcelIndex.load(tmp_path / "index.bin")
    unpickled = pickle.loads(pickle.dumps(index))
    np.testing.assert_array_equal(unpickled.run_col, index.run_col)
    assert unpickled.grid == index.grid
    assert loaded.grid == index.grid and loaded.window == index.window and loaded.buffer_m == -3.0
    for name in ("pids", "offsets", "run_row", "run_col", "run_len", "npixels"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
        assert getattr(loaded, name).dtype == getattr(index, name).dtype
    band = rng.integers(1, 100, size=(HEIGHT, WIDTH), dtype=np.uint16)
    np.testing.assert_array_equal(engine.band_stats(loaded, band).mean, engine.band_stats(index, band).mean)


def test_empty_and_invalid_inputs(tmp_path: Path) -> None:
    empty = engine.build_index([pbox(-50, -50, -40, -40), Polygon()], np.array([1, 2]), GRID)
    assert len(empty) == 0 and empty.window == (0, 0, 0, 0)
    band = np.ones((HEIGHT, WIDTH), np.uint16)
    values, offset = engine.read_window(write_tif(tmp_path / "one.tif", band), empty)
    assert len(engine.band_stats(empty, values, window_offset=offset)) == 0
    assert len(engine.band_stats(empty, band)) == 0
    assert len(engine.class_histograms(empty, band.astype(np.uint8))) == 0
    with pytest.raises(ValueError, match="pids"):
        engine.build_index([square(5, 5, 2)], np.array([1, 2]), GRID)
    with pytest.raises(ValueError, match="north-up"):
        engine.build_index([square(5, 5, 2)], np.array([1]), GeoBox((10, 10), Affine(10, 0, 0, 0, 10, 0), CRS))
    index = engine.build_index([square(5, 5, 2)], np.array([1]), GRID)
    with pytest.raises(ValueError, match="uint8"):
        engine.class_histograms(index, band)


@pytest.mark.parametrize("threads", [1, 2])
def test_strips_single_thread_and_prefetch_match_rasterstats(tmp_path: Path, threads: int) -> None:
    """One thread (decode and reduce alternate, ``CBMFLOW_WORKER_THREADS=1``) and the prefetching
    path give rasterstats' numbers, with tiny strips so parcels span many strip edges."""
    import numba

    rng = np.random.default_rng(21)
    band = uint16_band(rng)
    path = write_tif(tmp_path / "b.tif", band, nodata=0)
    geoms = mixed_parcels()
    pids = np.arange(100, 100 + len(geoms), dtype=np.int64)
    plan = engine.plan_strips(engine.build_index(geoms, pids, GRID), strip_rows=7)
    assert len(plan.steps) > 5
    seen: list[int] = []
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with rasterio.open(path) as src:
            read = engine.window_reader(src, plan.index)

            def recording_read(r0: int, r1: int) -> Any:
                seen.append(r0)
                return read(r0, r1)

            stats = engine.band_stats_strips(plan, recording_read, nodata=0)
    finally:
        numba.set_num_threads(before)
    assert seen == [r0 for r0, _ in plan.reads()], "every strip read once, in order"
    assert_matches(stats, pids, reference(geoms, path, nodata=0), rtol=1e-12)
