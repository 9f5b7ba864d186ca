"""The geoid step of CARD-BS's DEM: heights above EGM96 become ellipsoidal with the grid from
Debian's proj-data (a system package, hence not in the unit layer; a missing grid fails loudly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from card.geobox import GeoBox
from card.s1grd.dem import FileDem, geoid_grid_path

ROME_DEM = Path("../shared/data/sentinel1/Rome-30m-DEM.tif")


def test_egm96_heights_become_ellipsoidal_by_the_published_undulation(tmp_path: Path) -> None:
    grid_path = geoid_grid_path("egm96")  # FileNotFoundError names the package: the test fails, never skips
    # A flat 100 m EGM96 surface around Rome: ellipsoidal height = 100 m + N, and N(EGM96) at
    # 41.9° N 12.5° E is about +47 m (NGA's EGM96 calculator gives 46.9 m at 41.9 N, 12.5 E).
    dem = tmp_path / "flat100.tif"
    transform = Affine(0.01, 0, 12.4, 0, -0.01, 42.0)
    with rasterio.open(dem, "w", driver="GTiff", width=20, height=20, count=1, dtype="float32",
                       crs="EPSG:4326", transform=transform) as dst:  # fmt: skip
        dst.write(np.full((20, 20), 100.0, np.float32), 1)
    box = GeoBox((4, 4), Affine(0.02, 0, 12.42, 0, -0.02, 41.98), "EPSG:4326")
    heights = FileDem(dem, "egm96").heights(box)
    undulation = heights - 100.0
    assert grid_path.is_file() and np.all(np.isfinite(heights))
    assert 45.0 < float(np.median(undulation)) < 49.0, undulation
    assert np.allclose(FileDem(dem).heights(box), 100.0)  # without a geoid the heights are taken as they are
    assert "EGM96" in FileDem(ROME_DEM, "egm96").label
