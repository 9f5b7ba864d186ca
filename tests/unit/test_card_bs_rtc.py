"""CARD-BS on a map grid: terrain flattening against analytic expectations, masks, COG output.

Small synthetic crops of the real sarsen GRD geometry (constant DN through a fake measurement
reader); expected values are computed here from geometry, not taken from the code's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.bs import BsProcessor, generate_bs, grid_name
from card.s1grd.dem import Dem, FileDem, FlatDem
from card.s1grd.geocode import Geocoder, ecef
from card.s1grd.rtc import MASK_LAYOVER, MASK_NODATA, MASK_SHADOW, ellipsoid_up
from card.s1grd.safe import GrdProduct, open_grd

SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")
ROME_DEM = Path("../shared/data/sentinel1/Rome-30m-DEM.tif")
CRS = "EPSG:32633"
TO_UTM = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)
TO_LONLAT = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)


def constant_dn(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    return np.full((r1 - r0, c1 - c0), 500, np.uint16)


@pytest.fixture(scope="module")
def grd() -> GrdProduct:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE}")
    return open_grd(SAFE)


def grid_at(lon: float, lat: float, n: int, res: float = 10.0) -> GeoBox:
    x, y = TO_UTM.transform(lon, lat)
    return GeoBox((n, n), Affine(res, 0, round(x / res) * res, 0, -res, round(y / res) * res), CRS)


def run(grd: GrdProduct, grid: GeoBox, dem: Dem, quantity: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    proc = BsProcessor(grd.polarisations, grid, dem, quantity, denoise=False, readers={"VV": constant_dn})
    block = proc.process_block(slice(0, grid.height), slice(0, grid.width))
    return block.values["VV"], block.mask, block.local_incidence_deg


@dataclass(frozen=True)
class PlaneDem:
    """h = h0 + slope · (distance along ``direction``), an analytic tilted plane on the map grid."""

    origin: tuple[Any, Any]
    direction: tuple[float, float]
    slope: float
    h0: float = 100.0
    label: str = "plane"
    flat: bool = False

    def heights(self, box: GeoBox) -> np.ndarray:
        xx, yy = np.meshgrid(box.x_centres(), box.y_centres())
        d = (xx - self.origin[0]) * self.direction[0] + (yy - self.origin[1]) * self.direction[1]
        out: np.ndarray = self.h0 + self.slope * d
        return out


def towards_sensor_on_map(grd: GrdProduct, grid: GeoBox) -> tuple[float, float]:
    """Unit map vector of the horizontal direction from the grid centre towards the sensor."""
    cx, cy = grid.xy(grid.height // 2, grid.width // 2)
    lon, lat = TO_LONLAT.transform(cx, cy)
    p = ecef(lon, lat, 0.0)
    look = Geocoder(grd.polarisations["VV"].annotation).radar_position(p[None]).look[0]
    up = ellipsoid_up(p)
    g = look - np.dot(look, up) * up
    east = np.array([-np.sin(np.radians(lon)), np.cos(np.radians(lon)), 0.0])
    north = np.cross(up, east)
    de, dn = np.dot(g, east), np.dot(g, north)
    # to map axes (UTM grid convergence is taken care of by projecting a 100 m step)
    x1, y1 = TO_UTM.transform(*TO_LONLAT.transform(cx, cy))
    lon2 = lon + de * 100 / (111320 * np.cos(np.radians(lat)))
    lat2 = lat + dn * 100 / 110574
    x2, y2 = TO_UTM.transform(lon2, lat2)
    v = np.array([x2 - x1, y2 - y1])
    return float(v[0] / np.linalg.norm(v)), float(v[1] / np.linalg.norm(v))


def test_rtc_on_a_flat_dem_equals_ellipsoid_gamma0(grd: GrdProduct) -> None:
    grid = grid_at(13.56, 41.78, 120)  # mid-swath, away from the edges
    rtc, mask, _ = run(grd, grid, FlatDem(), "gamma0-rtc")
    gamma, _, _ = run(grd, grid, FlatDem(), "gamma0")
    ratio = rtc / gamma
    assert np.isfinite(ratio).all() and not mask.any()
    assert np.max(np.abs(ratio - 1)) < 0.01
    # and γ0 ellipsoid is β0·tan θ of the ellipsoid at each pixel (θ from geometry, not from the LUT)
    beta, _, _ = run(grd, grid, FlatDem(), "beta0")
    xx, yy = np.meshgrid(grid.x_centres(), grid.y_centres())
    lon, lat = TO_LONLAT.transform(xx, yy)
    p = ecef(lon, lat, np.zeros_like(xx))
    look = Geocoder(grd.polarisations["VV"].annotation).radar_position(p).look
    cos_t = np.einsum("...k,...k->...", look, ellipsoid_up(p))
    tan_t = np.sqrt(1 - cos_t**2) / cos_t
    assert np.max(np.abs(rtc / (beta * tan_t) - 1)) < 0.01


@pytest.mark.parametrize("slope_deg", [15.0, -20.0])
def test_rtc_on_a_tilted_plane_follows_the_facet_area(grd: GrdProduct, slope_deg: float) -> None:
    """A plane tilted in the range plane: A_γ/A_β per radar pixel = cot θ_loc, so γ0_RTC = β0·tan θ_loc.

    Positive slopes rise towards the sensor (a back slope, θ_loc = θ + slope), negative ones face it.
    """
    grid = grid_at(13.56, 41.78, 100)
    direction = towards_sensor_on_map(grd, grid)
    dem = PlaneDem(grid.xy(50, 50), direction, np.tan(np.radians(slope_deg)))
    rtc, mask, lia = run(grd, grid, dem, "gamma0-rtc")
    beta, _, _ = run(grd, grid, dem, "beta0")
    xx, yy = np.meshgrid(grid.x_centres(), grid.y_centres())
    lon, lat = TO_LONLAT.transform(xx, yy)
    p = ecef(lon, lat, dem.heights(grid))
    look = Geocoder(grd.polarisations["VV"].annotation).radar_position(p).look
    up = ellipsoid_up(p)
    east = np.stack([-np.sin(np.radians(lon)), np.cos(np.radians(lon)), np.zeros_like(lon)], axis=-1)
    north = np.cross(up, east)
    # the analytic plane normal: up tilted by the slope away from the direction of ascent
    d_en = np.array(direction)
    ascent = d_en[0] * east + d_en[1] * north
    n = up - np.tan(np.radians(slope_deg)) * ascent
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    cos_loc = np.einsum("...k,...k->...", n, look)
    expected = beta * np.sqrt(1 - cos_loc**2) / cos_loc
    inner = (slice(5, -5), slice(5, -5))
    ratio = (rtc / expected)[inner]
    assert np.median(np.abs(ratio - 1)) < 0.01 and np.percentile(np.abs(ratio - 1), 95) < 0.02
    assert np.median(np.abs(lia - np.degrees(np.arccos(cos_loc)))[inner]) < 0.2
    flat_gamma, _, _ = run(grd, grid, FlatDem(100.0), "gamma0-rtc")
    # a back slope is brightened relative to flat ground, a slope facing the sensor darkened
    change = np.median(rtc[inner] / flat_gamma[inner])
    assert change > 1.3 if slope_deg > 0 else change < 0.7
    assert not (mask[inner] & (MASK_LAYOVER | MASK_SHADOW)).any()


def test_layover_and_shadow_masks(grd: GrdProduct) -> None:
    grid = grid_at(13.56, 41.78, 40)
    direction = towards_sensor_on_map(grd, grid)
    # facing the sensor more steeply than the ~39° look angle: layover
    _, mask, _ = run(grd, grid, PlaneDem(grid.xy(20, 20), direction, np.tan(np.radians(-45.0))), "gamma0")
    assert np.all(mask[2:-2, 2:-2] & MASK_LAYOVER) and not np.any(mask[2:-2, 2:-2] & MASK_SHADOW)
    # facing away more steeply than 90° − 39°: shadow; 35° is neither
    _, mask, _ = run(grd, grid, PlaneDem(grid.xy(20, 20), direction, np.tan(np.radians(35.0))), "gamma0")
    assert not np.any(mask[2:-2, 2:-2])
    _, mask, _ = run(grd, grid, PlaneDem(grid.xy(20, 20), direction, np.tan(np.radians(60.0))), "gamma0")
    assert np.all(mask[2:-2, 2:-2] & MASK_SHADOW) and not np.any(mask[2:-2, 2:-2] & MASK_LAYOVER)


def test_cog_output_on_the_rome_dem(grd: GrdProduct, tmp_path: Path) -> None:
    if not ROME_DEM.is_file():
        pytest.skip(f"shared test data missing: {ROME_DEM}")
    grid = grid_at(12.452, 42.048, 600)
    out = generate_bs(str(SAFE), grid, FileDem(ROME_DEM), str(tmp_path), quantity="gamma0", readers={"VV": constant_dn})
    name = f"{grd.product_name}_{grid_name(grid)}_VV_GAMMA0_RTC.tif"
    assert Path(out.backscatter["VV"]).name == name.replace("_RTC", "_GTC")  # LUT γ0 is never called RTC
    with rasterio.open(out.backscatter["VV"]) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.dtypes == ("float32",) and np.isnan(ds.nodata)
        assert ds.transform.e < 0 and ds.transform == grid.transform  # north-up, on the grid
        assert ds.overviews(1)
        tags = ds.tags()
        assert tags["NOISE_REMOVED"] == "yes" and tags["IPF_VERSION"] == "003.40" and "ellipsoidal" in tags["DEM"]
        values = ds.read(1)
    assert np.isfinite(values).mean() > 0.99 and np.nanmin(values) > 0
    with rasterio.open(out.mask) as ds:
        mask = ds.read(1)
    assert ((mask & MASK_NODATA) > 0).sum() == (~np.isfinite(values)).sum()
    assert not list(tmp_path.glob("*.part.tif"))
