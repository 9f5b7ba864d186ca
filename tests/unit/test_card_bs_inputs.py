"""CARD-BS inputs: CDSE's COG-GRD layout and zipped products give the same backscatter as the
classic SAFE; ``--tile`` names and places the outputs on the Sentinel-2 tile grid.

Products are built from the real sarsen annotation with a synthetic measurement window
(tests/grd_products.py); the S3 variants of the same products are in
tests/integration/test_card_bs_s3_inputs.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import typer
from grd_products import SAFE, build_grd, dn_pattern, grid_and_window, require_safe
from typer.testing import CliRunner

from card.geobox import GeoBox
from card.s1grd.bs import generate_bs
from card.s1grd.dem import FlatDem
from card.s1grd.safe import open_grd
from worker.cardgen import register


def _values(product: str, grid: GeoBox, out: Path) -> np.ndarray:
    result = generate_bs(product, grid, FlatDem(), str(out), quantity="beta0", denoise=False)
    with rasterio.open(result.backscatter["VV"]) as ds:
        values: np.ndarray = ds.read(1)
    return values


def test_cdse_cog_grd_and_zips_read_like_the_classic_safe(tmp_path: Path) -> None:
    require_safe()
    grid, window = grid_and_window()
    classic = build_grd(tmp_path / "classic", window, dn_pattern)
    cog = build_grd(tmp_path / "cog", window, dn_pattern, cog=True)
    cog_zip = build_grd(tmp_path / "cogzip", window, dn_pattern, cog=True, as_zip=True)

    product = open_grd(cog)
    assert product.product_name == f"{SAFE.stem}_COG" and list(product.polarisations) == ["VV"]
    vv = product.polarisations["VV"]
    assert vv.measurement.endswith("-001-cog.tiff")
    assert vv.annotation.n_lines == 16705 and vv.noise.format == "range+azimuth"
    assert open_grd(cog_zip).polarisations["VV"].measurement.startswith("/vsizip/")

    ref = _values(str(classic), grid, tmp_path / "o1")
    assert np.isfinite(ref).all() and (ref > 0).all()
    assert np.ptp(ref) > 0  # the pattern is seen, not a constant
    for i, p in enumerate((cog, cog_zip)):
        assert np.array_equal(_values(str(p), grid, tmp_path / f"o{i + 2}"), ref)


def test_outside_the_written_window_is_fill_not_zero(tmp_path: Path) -> None:
    """The builder's own check: the sparse measurement's unwritten tiles are DN 0 = fill → NaN."""
    require_safe()
    grid, (r0, r1, c0, c1) = grid_and_window()
    product = build_grd(tmp_path, (r0, r1, c0 + (c1 - c0) // 2, c1), dn_pattern, cog=True)
    values = _values(str(product), grid, tmp_path / "o")
    assert np.isnan(values).any() and np.isfinite(values).any()


def test_card_bs_tile_names_and_places_the_outputs(tmp_path: Path) -> None:
    require_safe()
    app = typer.Typer()
    register(app)
    # 32UPU (Munich) and 39QTA (Arabia) are far from this GRD (Rome): every pixel is NaN, quickly
    # (a covered tile costs the calibration of the radar area under it); the grids and the names
    # are what is checked. 360 m divides the 109.8 km tile: 305 × 305 pixels.
    args = ["card", "bs", str(SAFE), "--out", str(tmp_path), "--tile", "32UPU", "--tile", "T39QTA"]
    result = CliRunner().invoke(app, [*args, "--resolution", "360", "--quantity", "sigma0"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.tif"))
    for tile in ("32UPU", "39QTA"):
        for suffix in ("VV_SIGMA0_GTC", "MASK", "LIA"):
            assert f"{SAFE.stem}_{tile}_{suffix}.tif" in names
    with rasterio.open(tmp_path / f"{SAFE.stem}_32UPU_VV_SIGMA0_GTC.tif") as ds:
        assert ds.crs.to_epsg() == 32632 and ds.shape == (305, 305)
        assert tuple(ds.transform)[:6] == (360.0, 0.0, 600000.0, 0.0, -360.0, 5400000.0)
        assert ds.tags()["GRID"] == "32UPU"
    with rasterio.open(tmp_path / f"{SAFE.stem}_39QTA_VV_SIGMA0_GTC.tif") as ds:  # the real item's origin
        assert ds.crs.to_epsg() == 32639 and tuple(ds.transform)[:6] == (360.0, 0.0, 199980.0, 0.0, -360.0, 2100000.0)


@pytest.mark.parametrize("bad", ["--orbit", "--dem"])
def test_missing_orbit_or_dem_file_is_one_line(tmp_path: Path, bad: str) -> None:
    app = typer.Typer()
    register(app)
    args = ["card", "bs", str(SAFE), "--out", str(tmp_path), "--tile", "33TUG", bad, str(tmp_path / "nope")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "not found" in result.output
