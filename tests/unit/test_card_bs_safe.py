"""CARD-BS radar-geometry steps on the real sarsen GRD annotation: reading, calibration, noise, geometry.

Expected values come from the XML itself (LUT nodes, geolocation grid), never from the code under test.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest

from card.s1grd.calibration import calibrate, interpolate_vectors, noise_power
from card.s1grd.geocode import SPEED_OF_LIGHT, Geocoder, ecef
from card.s1grd.safe import GrdProduct, open_grd, read_noise

SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")


@pytest.fixture(scope="module")
def grd() -> GrdProduct:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE}")
    return open_grd(SAFE)


def test_reads_annotation_calibration_and_noise(grd: GrdProduct) -> None:
    assert grd.ipf_version == "003.40"
    assert list(grd.polarisations) == ["VV"]
    vv = grd.polarisations["VV"]
    a = vv.annotation
    assert (a.n_lines, a.n_samples) == (16705, 26102)
    assert a.pass_direction == "Descending"
    assert a.orbit.t.size == 16 and np.allclose(np.diff(a.orbit.t), 10.0)
    assert a.grid.line.size == 210 and a.conversion.t.size == 28 and a.conversion.srgr.shape == (28, 9)
    assert a.azimuth_time_interval_s == pytest.approx(1.496569996245720e-03, rel=0, abs=0)
    assert len(vv.calibration.beta.lines) == 27 and vv.calibration.beta.pixels[0].size == 654
    assert vv.noise.format == "range+azimuth"
    assert vv.noise.range.pixels[0].size == 657  # differs from the calibration vectors' 654
    assert [(b.swath, b.first_sample, b.last_sample) for b in vv.noise.azimuth] == [
        ("IW1", 0, 8889),
        ("IW2", 8890, 17700),
        ("IW3", 17701, 26101),
    ]


def test_reads_a_zipped_safe(grd: GrdProduct, tmp_path: Path) -> None:
    z = tmp_path / f"{SAFE.stem}.zip"
    with zipfile.ZipFile(z, "w") as out:
        for f in SAFE.rglob("*.xml"):
            out.write(f, f"{SAFE.name}/{f.relative_to(SAFE)}")
        out.write(SAFE / "manifest.safe", f"{SAFE.name}/manifest.safe")
        for f in (SAFE / "measurement").iterdir():
            out.write(f, f"{SAFE.name}/measurement/{f.name}")
    zipped = open_grd(z)
    assert zipped.product_name == grd.product_name
    vv = zipped.polarisations["VV"]
    assert vv.measurement.startswith("/vsizip/") and vv.measurement.endswith(".tiff")
    assert np.array_equal(vv.annotation.grid.lat, grd.polarisations["VV"].annotation.grid.lat)


def test_constant_dn_gives_dn2_over_lut2_exactly_at_lut_nodes(grd: GrdProduct) -> None:
    vv = grd.polarisations["VV"]
    cal = vv.calibration
    k = 5  # a calibration vector inside the scene
    line = int(cal.beta.lines[k])
    window = np.full((1, 1201), 123, dtype=np.uint16)
    for quantity, lut in (("beta0", cal.beta), ("sigma0", cal.sigma), ("gamma0", cal.gamma)):
        x = calibrate(window, cal, None, quantity=quantity, row0=line, col0=0)
        nodes = lut.pixels[k][lut.pixels[k] <= 1200].astype(int)
        expected = 123.0**2 / lut.values[k][: nodes.size] ** 2
        assert np.array_equal(x[0, nodes], expected)
    # between vectors: linear in line, checked at the midpoint of two vectors at a node pixel
    mid = (int(cal.beta.lines[k]) + int(cal.beta.lines[k + 1])) / 2
    a = interpolate_vectors(cal.beta, [mid], [400.0])[0, 0]
    assert a == pytest.approx(0.5 * (cal.beta.values[k][10] + cal.beta.values[k + 1][10]), rel=1e-12)
    # ... and linear in pixel between nodes
    b = interpolate_vectors(cal.sigma, [line], [420.0])[0, 0]
    assert b == pytest.approx(0.5 * (cal.sigma.values[k][10] + cal.sigma.values[k][11]), rel=1e-12)


def test_noise_is_range_times_azimuth_inside_each_block(grd: GrdProduct) -> None:
    noise = grd.polarisations["VV"].noise
    k = 3
    line = int(noise.range.lines[k])
    pixels = noise.range.pixels[k][[5, 300, 600]]  # one node in each sub-swath
    eta = noise_power(noise, [line], pixels)[0]
    for j, p in enumerate(pixels):
        block = next(b for b in noise.azimuth if b.first_sample <= p <= b.last_sample)
        az = np.interp(line, block.lines, block.values)
        rg = noise.range.values[k][noise.range.pixels[k] == p][0]
        assert eta[j] == pytest.approx(rg * az, rel=1e-12)


def test_removed_noise_is_zero_and_fill_is_nan(grd: GrdProduct) -> None:
    vv = grd.polarisations["VV"]
    lines, pixels = np.arange(4000, 4004), np.arange(8880, 8900)  # across the IW1/IW2 seam
    eta = noise_power(vv.noise, lines, pixels)
    dn = np.sqrt(eta) * (1 - 1e-9)  # just under the noise floor
    dn[0, 0] = 0.0  # fill
    dn[1, :] = np.sqrt(eta[1] + 1000.0)  # 1000 DN² above the floor
    x = calibrate(dn, vv.calibration, vv.noise, quantity="beta0", row0=4000, col0=8880)
    assert np.isnan(x[0, 0]) and np.isnan(x).sum() == 1
    assert np.all(x[2:] == 0.0) and np.all(x[0, 1:] == 0.0)
    beta = interpolate_vectors(vv.calibration.beta, lines[1:2], pixels)[0]
    assert np.allclose(x[1], 1000.0 / beta**2, rtol=1e-9)
    # without denoising the same DN give DN²/A² > 0
    raw = calibrate(dn, vv.calibration, None, quantity="beta0", row0=4000, col0=8880)
    assert np.all(raw[2:] > 0)


def test_old_range_only_noise_format(grd: GrdProduct) -> None:
    """IPF < 2.9 ``noiseVectorList``: rebuilt from this product's range vectors, so η = N_range."""
    xml = next((SAFE / "annotation" / "calibration").glob("noise-*.xml")).read_text()
    xml = re.sub(r"<noiseAzimuthVectorList.*</noiseAzimuthVectorList>", "", xml, flags=re.S)
    for new, old in (("noiseRangeVectorList", "noiseVectorList"), ("noiseRangeVector", "noiseVector")):
        xml = xml.replace(new, old)
    xml = xml.replace("noiseRangeLut", "noiseLut")
    old_noise = read_noise(ET.fromstring(xml))
    assert old_noise.format == "range-only" and old_noise.azimuth == ()
    new_noise = grd.polarisations["VV"].noise
    lines, pixels = np.arange(0, 16705, 997), np.arange(0, 26102, 1301)
    assert np.array_equal(noise_power(old_noise, lines, pixels), interpolate_vectors(new_noise.range, lines, pixels))


def test_geocoding_matches_the_geolocation_grid(grd: GrdProduct) -> None:
    """Every tie point (lat, lon, height) → (line, pixel) and back to the annotated times."""
    a = grd.polarisations["VV"].annotation
    g = a.grid
    pos = Geocoder(a).radar_position(ecef(g.lon, g.lat, g.height))
    # the physics, independent of any GRD convention: zero-Doppler time and two-way range time
    assert np.max(np.abs(pos.azimuth_time - g.azimuth_time)) < 1e-5  # s (0.007 line)
    assert np.max(np.abs(2 * pos.slant_range / SPEED_OF_LIGHT - g.slant_range_time)) * a.range_sampling_rate_hz < 1e-3
    # the image coordinates (issue 12: median ≤ 0.05 px in range, ≤ 0.5 line in azimuth)
    assert np.median(np.abs(pos.pixel - g.pixel)) <= 0.05
    assert np.median(np.abs(pos.line - g.line)) <= 0.5
    assert np.max(np.abs(pos.pixel - g.pixel)) <= 0.05 and np.max(np.abs(pos.line - g.line)) <= 0.05


def test_geocoding_line_convention_holds_out_of_sample(grd: GrdProduct) -> None:
    """The τ/2 line offset fitted on half of the grid's rows predicts the other half."""
    import dataclasses

    a = grd.polarisations["VV"].annotation
    g = a.grid
    rows = np.unique(g.line)
    fit = np.isin(g.line, rows[::2])
    half = dataclasses.replace(g, **{f.name: getattr(g, f.name)[fit] for f in dataclasses.fields(g)})
    geo = Geocoder(dataclasses.replace(a, grid=half))
    test = ~fit
    pos = geo.radar_position(ecef(g.lon[test], g.lat[test], g.height[test]))
    assert np.max(np.abs(pos.line - g.line[test])) <= 0.05


def test_srgr_conventions_nearest_follows_the_grid_interpolated_is_continuous(grd: GrdProduct) -> None:
    """The geolocation grid follows the nearest coordinateConversion entry; interpolating (sarsen) is
    off by up to ~0.5 px."""
    a = grd.polarisations["VV"].annotation
    g = a.grid
    points = ecef(g.lon, g.lat, g.height)
    nearest = Geocoder(a).radar_position(points)
    interpolated = Geocoder(a, srgr_interpolated=True).radar_position(points)
    assert np.array_equal(interpolated.pixel, interpolated.pixel_smooth)
    assert np.median(np.abs(interpolated.pixel - g.pixel)) > 0.05 > np.median(np.abs(nearest.pixel - g.pixel))
    assert np.max(np.abs(interpolated.pixel - nearest.pixel)) < 1.0
