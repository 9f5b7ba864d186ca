"""card.geobox.GeoBox against rasterio, the reference for what a (transform, shape) pair means.

Every box here is deliberately non-square (3 rows, 5 columns, or pixels 10 m wide and 20 m tall),
so that a method swapping rows and columns, or x and y, gives a different answer and fails.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.transform
import rasterio.windows
from affine import Affine
from rasterio.windows import Window

from card.geobox import GeoBox, Resolution

NY, NX = 3, 5  # rows (y), columns (x)
T = Affine(10.0, 0.0, 600_000.0, 0.0, -20.0, 5_400_020.0)  # 10 m columns, 20 m rows, north-up
BOX = GeoBox((NY, NX), T, 32632)


def _rasterio_window(window: Window) -> tuple[Affine, tuple[float, float, float, float]]:
    """rasterio's transform and bounds of ``window`` on ``T``, the reference for sub-boxes."""
    with warnings.catch_warnings():  # rasterio still multiplies affine matrices with "*"
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return rasterio.windows.transform(window, T), rasterio.windows.bounds(window, T)


def test_shape_is_rows_then_columns_as_rasterio_reads_it(tmp_path: Path) -> None:
    assert (BOX.height, BOX.width) == (3, 5)
    assert BOX.resolution == Resolution(x=10.0, y=-20.0)
    data = np.arange(NY * NX, dtype=np.uint8).reshape(BOX.shape)
    path = tmp_path / "a.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=BOX.width,
        height=BOX.height,
        count=1,
        dtype="uint8",
        crs="EPSG:32632",
        transform=T,
    ) as dst:
        dst.write(data, 1)
    with rasterio.open(path) as src:
        got = GeoBox.from_dataset(src)
        assert src.read(1).shape == got.shape == BOX.shape
        assert got.transform == T and got.crs == "EPSG:32632"


def test_bounds_match_rasterio() -> None:
    # x spans 5 columns of 10 m, y spans 3 rows of 20 m: 50 m by 60 m.
    assert BOX.bounds == rasterio.transform.array_bounds(NY, NX, T)
    assert BOX.bounds == (600_000.0, 5_399_960.0, 600_050.0, 5_400_020.0)
    south_up = GeoBox((NY, NX), Affine(10.0, 0.0, 0.0, 0.0, 20.0, 100.0), 32632)
    assert south_up.bounds == (0.0, 100.0, 50.0, 160.0)
    assert not south_up.north_up and south_up.axis_aligned and BOX.north_up


def test_pixel_centres_match_rasterio_xy() -> None:
    rows, cols = np.meshgrid(np.arange(NY), np.arange(NX), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    x, y = BOX.xy(rows, cols)
    want_x, want_y = rasterio.transform.xy(T, rows, cols, offset="center")
    np.testing.assert_allclose(x, want_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-9)
    assert (x[0], y[0]) == (600_005.0, 5_400_010.0)  # first pixel: half a column east, half a row south
    assert (x[NX], y[NX]) == (600_005.0, 5_399_990.0)  # first pixel of the second row
    # The per-axis form is bit for bit the same on an axis-aligned grid (the generator relies on it).
    assert np.array_equal(BOX.x_centres(cols), x) and np.array_equal(BOX.y_centres(rows), y)
    assert len(BOX.x_centres()) == NX and len(BOX.y_centres()) == NY


def test_rotated_grid_centres_match_rasterio_and_have_no_axes() -> None:
    rotated = GeoBox((NY, NX), Affine.translation(500.0, 900.0) @ Affine.rotation(30.0) @ Affine.scale(10.0, -20.0), 0)
    x, y = rotated.xy([0, 2, 1], [4, 0, 3])
    want_x, want_y = rasterio.transform.xy(rotated.transform, [0, 2, 1], [4, 0, 3], offset="center")
    np.testing.assert_allclose(x, want_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="rotated"):
        rotated.x_centres()
    with pytest.raises(ValueError, match="rotated"):
        rotated.fractional_rowcol([500.0], [900.0])


def test_fractional_rowcol_floors_to_rasterio_rowcol() -> None:
    xs = np.array([600_000.0, 600_049.9, 600_012.5, 600_030.0])
    ys = np.array([5_400_020.0, 5_399_960.1, 5_400_001.0, 5_399_980.0])
    rows, cols = BOX.fractional_rowcol(xs, ys)
    want_rows, want_cols = rasterio.transform.rowcol(T, xs, ys)
    assert np.floor(rows).astype(int).tolist() == list(want_rows)
    assert np.floor(cols).astype(int).tolist() == list(want_cols)
    assert (rows[3], cols[3]) == (2.0, 3.0)  # a pixel corner is a whole number on both axes


def test_slice_and_window_of_a_sub_box() -> None:
    sub = BOX[1:3, 2:5]
    assert sub.shape == (2, 3)
    # The textbook window transform: the grid's, moved by (2 columns, 1 row) of its own pixels.
    assert sub.transform == T @ Affine.translation(2, 1)
    assert sub.transform == _rasterio_window(Window(col_off=2, row_off=1, width=3, height=2))[0]
    assert sub.bounds == _rasterio_window(Window(col_off=2, row_off=1, width=3, height=2))[1]
    rows, cols = BOX.window_of(sub)
    assert (rows, cols) == (slice(1, 3), slice(2, 5))
    data = np.arange(NY * NX).reshape(BOX.shape)
    assert data[BOX.window_of(sub)].shape == sub.shape
    assert BOX[rows, cols] == sub
    # Slices clip like numpy's, so box[roi] always describes array[roi].
    assert BOX[:, 3:99].shape == data[:, 3:99].shape == (3, 2)
    assert BOX[-1:, :].transform == BOX.shifted(rows=2, cols=0).transform


def test_window_of_rejects_what_would_misregister() -> None:
    with pytest.raises(ValueError, match="pixel corner"):
        BOX.window_of(GeoBox((1, 1), T @ Affine.translation(0.5, 0.0), 32632))
    with pytest.raises(ValueError, match="pixel grid"):
        BOX.window_of(BOX.zoomed_out(2))
    with pytest.raises(ValueError, match="pixel grid"):
        BOX.window_of(GeoBox(BOX.shape, T, "EPSG:32632"))
    with pytest.raises(ValueError, match="inside"):
        BOX.window_of(BOX.shifted(rows=1, cols=0))


def test_shifted_may_leave_the_box_as_rasterio_windows_do() -> None:
    moved = BOX.shifted(rows=-2, cols=-3, shape=(7, 9))
    assert moved.shape == (7, 9)
    assert moved.transform == T @ Affine.translation(-3, -2)
    assert moved.transform == _rasterio_window(Window(col_off=-3, row_off=-2, width=9, height=7))[0]


def test_zoomed_out_keeps_the_origin_and_drops_partial_pixels() -> None:
    coarse = BOX.zoomed_out(2)
    assert coarse.shape == (1, 2)
    assert coarse.resolution == Resolution(x=20.0, y=-40.0)
    assert (coarse.bounds.left, coarse.bounds.top) == (BOX.bounds.left, BOX.bounds.top)
    with pytest.raises(ValueError, match="positive"):
        BOX.zoomed_out(0)


def test_equality_and_hash_make_it_a_cache_key() -> None:
    same = GeoBox((np.int64(NY), np.int64(NX)), Affine(*tuple(T)[:6]), 32632)
    assert same == BOX and hash(same) == hash(BOX)
    assert same.shape == (3, 5) and type(same.shape[0]) is int
    cache = {BOX: "index"}
    assert cache[same] == "index"
    assert GeoBox((NX, NY), T, 32632) != BOX  # transposed
    assert GeoBox((NY, NX), T, "EPSG:32632") != BOX  # CRS compared as given
    with pytest.raises(ValueError, match="negative"):
        GeoBox((-1, 2), T, 32632)
    with pytest.raises(ValueError, match=r"\(ny, nx\)"):
        GeoBox((1, 2, 3), T, 32632)  # type: ignore[arg-type]
