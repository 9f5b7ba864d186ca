"""``cbmflow card bs`` on the real (zero-filled) sarsen GRD: options → files, fill → NaN, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import typer
from typer.testing import CliRunner

from card.s1grd.rtc import MASK_NODATA
from worker.cardgen import register
from worker.cardopts import build_grid

app = typer.Typer()
register(app)
SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")


def test_grid_is_snapped_outwards_to_whole_pixels() -> None:
    grid = build_grid("epsg:32633", (288641.0, 4652001.0, 289000.0, 4652349.0), 10.0)
    assert grid.crs == "EPSG:32633"
    assert (grid.transform.c, grid.transform.f) == (288640.0, 4652350.0)
    assert grid.shape == (35, 36)
    with pytest.raises(ValueError):
        build_grid("EPSG:32633", (1.0, 1.0, 0.0, 2.0), 10.0)


def test_card_bs_writes_one_cog_per_polarisation_and_fill_is_nan(tmp_path: Path) -> None:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE}")
    # the stored measurement is all zeros (fill): every output pixel must be no data, never 0
    args = ["card", "bs", str(SAFE), "--out", str(tmp_path), "--crs", "EPSG:32633", "--quantity", "sigma0"]
    args += ["--bounds", "289130", "4657250", "289630", "4657750", "--resolution", "10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tifs = sorted(p.name for p in tmp_path.glob("*.tif"))
    stem = f"{SAFE.stem}_EPSG32633-E289130-N4657750-10m"
    assert tifs == sorted([f"{stem}_VV_SIGMA0_GTC.tif", f"{stem}_MASK.tif", f"{stem}_LIA.tif"])
    with rasterio.open(tmp_path / f"{stem}_VV_SIGMA0_GTC.tif") as ds:
        assert ds.shape == (50, 50) and np.isnan(ds.read(1)).all()
        assert ds.tags()["DEM"] == "flat-ellipsoid" and ds.tags()["SOFTWARE"].startswith("cbmflow ")
    with rasterio.open(tmp_path / f"{stem}_MASK.tif") as ds:
        assert (ds.read(1) & MASK_NODATA).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tile", "33TUG", "--crs", "EPSG:32633"], "either --tile or --crs/--bounds"),
        (["--tile", "33TIG"], "not a Sentinel-2 tile name"),
        (["--tile", "33TUG", "--resolution", "7"], "does not divide"),
        (["--crs", "EPSG:32633"], "give the output grid"),
        (["--crs", "EPSG:32633", "--bounds", "0", "0", "10", "10", "--quantity", "db"], "--quantity must be one of"),
        (["--crs", "EPSG:32633", "--bounds", "0", "0", "10", "10", "--dem", "/nonexistent.tif"], "not found"),
    ],
)
def test_card_bs_bad_options_fail_with_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["card", "bs", str(SAFE), "--out", str(tmp_path), *extra])
    assert result.exit_code == 1
    assert message in result.output


def test_card_bs_not_a_safe(tmp_path: Path) -> None:
    args = ["card", "bs", str(tmp_path), "--out", str(tmp_path / "o"), "--crs", "EPSG:32633"]
    result = CliRunner().invoke(app, [*args, "--bounds", "0", "0", "10", "10"])
    assert result.exit_code == 1 and "no manifest.safe" in result.output
