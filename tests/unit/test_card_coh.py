"""CARD-COH on the real geometry of a same-track IW2 pair 12 days apart, with synthetic pixels.

The pair's annotation (orbits, burst lists, FM-rate and Doppler polynomials) is real
(../shared/data/sentinel1/coh-pair, from hyp3-isce2). The pixels come from a ground field of
point scatterers projected through each date's geometry by :mod:`card.s1slc.synthetic` (its own
zero-Doppler solve and its own TOPS carrier), with a_late = γ·a_early + √(1−γ²)·n. Expectations
come from the estimator's distribution (Touzi et al. 1999, checked here by Monte Carlo), from the
single-date intensity statistics (equivalent number of looks) and from the pair's baseline, never
from the processor's own output. The test area (1.5 km × 3 km at 10 m, mid-swath) straddles the
boundary between bursts 3 and 4.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.errors
import typer
from affine import Affine
from pyproj import Transformer
from slc_pairs import EARLY, LATE, require_pair, scatterer_window, write_safe
from typer.testing import CliRunner

from card.geobox import GeoBox
from card.s1grd.dem import FlatDem
from card.s1grd.orbit import OrbitInterpolator
from card.s1slc import synthetic as syn
from card.s1slc.coh import BlockResult, CohProcessor, SwathDate, boxcar, expected_coherence
from card.s1slc.safe import SlcProduct, open_slc
from card.s1slc.tops import BurstCarrier

ROWS, COLS = 300, 150
K = 7


@dataclass
class Scene:
    early: SlcProduct
    late: SlcProduct
    grid: GeoBox
    e_a: syn.SyntheticSwath
    l_a: syn.SyntheticSwath
    l_n: syn.SyntheticSwath

    def late_with(self, gamma: float) -> syn.SyntheticSwath:
        data = gamma * self.l_a.data + math.sqrt(1 - gamma * gamma) * self.l_n.data
        return syn.SyntheticSwath(self.l_a.swath, self.l_a.row0, self.l_a.col0, data.astype(np.complex64))

    def run(self, late: syn.SyntheticSwath, *, deramp: bool = True) -> BlockResult:
        readers = {("early", "IW2", "VV"): self.e_a.reader(), ("late", "IW2", "VV"): late.reader()}
        proc = CohProcessor(self.early, self.late, self.grid, FlatDem(), K, readers=readers, deramp=deramp)
        proc.keep_geocoded = True
        return proc.process_block(slice(0, ROWS), slice(0, COLS))


@pytest.fixture(scope="module")
def scene() -> Scene:
    require_pair()
    early, late = open_slc(EARLY, ("VV",), ("IW2",)), open_slc(LATE, ("VV",), ("IW2",))
    se, sl = early.swaths[("IW2", "VV")], late.swaths[("IW2", "VV")]
    # centre: the early date's burst 3|4 boundary time, mid-swath, located on the geolocation grid
    boundary = SwathDate({"VV": se}, {}, 0.0).span[4, 0]
    g = se.grid
    col = g.pixel == g.pixel[np.argmin(np.abs(g.pixel - 13000))]
    order = np.argsort(g.azimuth_time[col])
    lon = float(np.interp(boundary, g.azimuth_time[col][order], g.lon[col][order]))
    lat = float(np.interp(boundary, g.azimuth_time[col][order], g.lat[col][order]))
    crs = f"EPSG:{32600 + int((lon + 180) // 6) + 1}"
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    x0, y1 = round(x / 10) * 10 - COLS * 5, round(y / 10) * 10 + ROWS * 5
    grid = GeoBox((ROWS, COLS), Affine(10.0, 0.0, x0, 0.0, -10.0, y1), crs)
    rng = np.random.default_rng(2026)
    field = grid.shifted(rows=-15, cols=-15, shape=(ROWS + 30, COLS + 30))
    common = syn.scatterers(field, 5.0, rng)
    other = syn.scatterers(field, 5.0, rng)  # an unrelated scene: n of s2 = γ·s1 + √(1−γ²)·n
    a = syn.complex_gaussian(len(common.x), rng)
    n = syn.complex_gaussian(len(other.x), rng)
    we, wl = scatterer_window(se, common.points), scatterer_window(sl, np.concatenate([common.points, other.points]))
    return Scene(
        early,
        late,
        grid,
        syn.simulate(se, common.points, a, *we),
        syn.simulate(sl, common.points, a, *wl),
        syn.simulate(sl, other.points, n, *wl),
    )


@pytest.fixture(scope="module")
def identical(scene: Scene) -> BlockResult:
    return scene.run(scene.l_a)


def _enl(s: np.ndarray) -> float:
    """Equivalent number of looks of one date's k × k mean intensity: mean² / variance."""
    inten = np.asarray(boxcar(np.abs(s) ** 2, K), np.float64) / (K * K)
    return float(inten.mean() ** 2 / inten.var())


def _spectral_overlap(bandwidth: float, shift: float) -> float:
    """Coherence of two band-limited signals whose spectra are ``shift`` apart (cycles/sample):
    |∫|h(x)|² e^{j2π·shift·x} dx| / ∫|h|², h the generator's windowed-sinc response."""
    x = np.arange(-syn.KERNEL_HALF * 64, syn.KERNEL_HALF * 64 + 1) / 64
    u = x / syn.KERNEL_HALF
    h = bandwidth * np.sinc(bandwidth * x) * (0.42 + 0.5 * np.cos(np.pi * u) + 0.08 * np.cos(2 * np.pi * u))
    p = h * h
    return float(abs(np.sum(p * np.exp(2j * np.pi * shift * x))) / p.sum())


def _baseline_coherence(scene: Scene) -> float:
    """Range spectral shift (perpendicular baseline) × azimuth Doppler offset (burst timing), from the orbits."""
    se, sl = scene.early.swaths[("IW2", "VV")], scene.late.swaths[("IW2", "VV")]
    xs, ys = scene.grid.xy(np.array([ROWS // 2]), np.array([COLS // 2]))
    lon, lat = Transformer.from_crs(scene.grid.crs, "EPSG:4326", always_xy=True).transform(xs, ys)
    from card.s1grd.geocode import ecef

    p = ecef(lon, lat, np.zeros(1))
    oe, ol = OrbitInterpolator(se.orbit), OrbitInterpolator(sl.orbit)
    te, re = syn.zero_doppler(oe, p, se.bursts[4].azimuth_time_s)
    tl, rl = syn.zero_doppler(ol, p, sl.bursts[4].azimuth_time_s)
    s_e, s_l = oe.state(te)[0][0], ol.state(tl)[0][0]
    los = (s_e - p[0]) / re[0]
    b = s_l - s_e
    b_perp = float(np.linalg.norm(b - np.dot(b, los) * los))
    up = p[0] / np.linalg.norm(p[0])
    incidence = math.acos(float(np.dot(los, up)))
    range_shift_hz = se.radar_frequency_hz * b_perp / (re[0] * math.tan(incidence))
    # the late burst starts at another ground position: its Doppler ramp is offset by k_t·Δη
    dt = se.azimuth_time_interval_s
    d_lines = (tl[0] - sl.bursts[4].azimuth_time_s) / dt - (te[0] - se.bursts[4].azimuth_time_s) / dt
    kt = BurstCarrier.of(se, se.bursts[4]).range_terms(np.array([13000.0]))[0][0]
    az_shift_hz = kt * d_lines * dt
    return _spectral_overlap(syn.RANGE_BANDWIDTH, range_shift_hz / se.range_sampling_rate_hz) * _spectral_overlap(
        syn.AZIMUTH_BANDWIDTH, az_shift_hz * dt
    )


# --- reading -------------------------------------------------------------------------------------


def test_burst_list_and_polynomials_as_in_the_xml() -> None:
    require_pair()
    product = open_slc(EARLY)
    assert sorted(product.swaths) == [("IW2", "VH"), ("IW2", "VV")] and product.ipf_version == "003.91"
    sw = product.swaths[("IW2", "VV")]
    xml = next((EARLY / "annotation").glob("s1a-iw2-slc-vv-*.xml"))
    root = ET.parse(xml).getroot()
    bursts = root.findall("swathTiming/burstList/burst")
    assert len(sw.bursts) == len(bursts) == 9 and sw.lines_per_burst == 1513 and sw.n_lines == 9 * 1513
    b1 = bursts[1]
    first = np.array(b1.findtext("firstValidSample", "").split(), dtype=int)
    last = np.array(b1.findtext("lastValidSample", "").split(), dtype=int)
    assert sw.bursts[1].burst_id == int(b1.findtext("burstId", "")) == 230133
    assert sw.bursts[1].byte_offset == int(b1.findtext("byteOffset", ""))
    assert sw.bursts[1].first_line == 1513
    valid = np.flatnonzero(first >= 0)
    assert sw.bursts[1].valid_lines == (valid[0], valid[-1])
    assert sw.bursts[1].valid_samples == (first[valid].max(), last[valid].min())
    assert sw.azimuth_steering_rate_rad_s == pytest.approx(math.radians(0.9798633249999998), rel=1e-12)
    fm = root.find("generalAnnotation/azimuthFmRateList/azimuthFmRate/azimuthFmRatePolynomial")
    dc = root.find("dopplerCentroid/dcEstimateList/dcEstimate/dataDcPolynomial")
    assert fm is not None and dc is not None
    np.testing.assert_array_equal(sw.fm_rate.coeffs[0], np.array((fm.text or "").split(), dtype=float))
    np.testing.assert_array_equal(sw.doppler.coeffs[0], np.array((dc.text or "").split(), dtype=float))
    assert sw.measurement is None  # annotation-only fixture


def test_tops_carrier_agrees_with_the_generator_and_spans_many_prfs(scene: Scene) -> None:
    sw = scene.early.swaths[("IW2", "VV")]
    burst = sw.bursts[4]
    carrier = BurstCarrier.of(sw, burst)
    rng = np.random.default_rng(1)
    line, sample = rng.uniform(0, burst.lines, 500), rng.uniform(0, sw.n_samples, 500)
    speed = float(np.linalg.norm(OrbitInterpolator(sw.orbit).state(np.array(carrier.t_mid_s))[1]))
    np.testing.assert_allclose(carrier.phase(line, sample), syn.tops_phase(sw, burst, line, sample, speed), atol=1e-6)
    window = carrier.deramp_window(100, 140, 12000, 12100)  # the compiled exp(−jφ) of the windows
    np.testing.assert_allclose(window, np.exp(-1j * carrier.phase_window(100, 140, 12000, 12100)), atol=1e-6)
    kt = carrier.range_terms(np.array([0.0, 13000.0, sw.n_samples - 1.0]))[0]
    span_hz = kt * burst.lines * sw.azimuth_time_interval_s
    prf = 1.0 / sw.azimuth_time_interval_s
    assert np.all((span_hz > 8 * prf) & (span_hz < 10 * prf))  # ~4.5 kHz of Doppler over a ~0.49 kHz PRF


# --- coherence -------------------------------------------------------------------------------------


def test_estimator_bias_formula_matches_monte_carlo() -> None:
    rng = np.random.default_rng(7)
    for looks in (4, 25):
        for gamma in (0.0, 0.5, 0.9):
            a = (rng.normal(size=(20000, looks)) + 1j * rng.normal(size=(20000, looks))) / math.sqrt(2)
            n = (rng.normal(size=(20000, looks)) + 1j * rng.normal(size=(20000, looks))) / math.sqrt(2)
            b = gamma * a + math.sqrt(1 - gamma * gamma) * n
            est = np.abs((a * b.conj()).sum(1)) / np.sqrt((np.abs(a) ** 2).sum(1) * (np.abs(b) ** 2).sum(1))
            assert expected_coherence(gamma, looks) == pytest.approx(est.mean(), abs=0.005)
    assert expected_coherence(0.0, 25) == pytest.approx(math.sqrt(math.pi / 100), rel=0.01)


def test_common_field_through_both_geometries_gives_one(scene: Scene, identical: BlockResult) -> None:
    coh = identical.coherence["VV"]
    assert np.isfinite(coh).mean() == 1.0
    predicted = _baseline_coherence(scene)
    assert 0.99 < predicted < 1.0
    assert np.mean(coh) >= 0.99 and np.percentile(coh, 1) >= 0.985
    assert np.mean(coh) >= predicted - 0.005


def test_burst_overlap_one_source_per_pixel_and_no_seam(identical: BlockResult) -> None:
    src = identical.source[K // 2 : -(K // 2), K // 2 : -(K // 2)]
    codes, counts = np.unique(src, return_counts=True)
    assert list(codes) == [3, 4] and counts.min() > 0.3 * src.size  # two bursts, each pixel from one
    row_mean = np.mean(identical.coherence["VV"], axis=1)
    mixed = np.flatnonzero([(r == 3).any() and (r == 4).any() for r in src])
    assert mixed.size > 0
    near = np.abs(np.arange(ROWS)[:, None] - mixed[None, :]).min(axis=1) <= K
    assert abs(row_mean[near].mean() - row_mean[~near].mean()) < 0.002
    assert row_mean.min() > 0.99


@pytest.mark.parametrize("gamma", [0.9, 0.7, 0.5, 0.3])
def test_coherence_recovered_within_the_estimator_bias(scene: Scene, identical: BlockResult, gamma: float) -> None:
    result = scene.run(scene.late_with(gamma))
    s_early = result.geocoded["VV"][0][K // 2 : -(K // 2), K // 2 : -(K // 2)]
    looks = _enl(s_early)
    expected = expected_coherence(gamma * _baseline_coherence(scene), looks)
    assert np.mean(result.coherence["VV"]) == pytest.approx(expected, abs=0.02)


def test_independent_scenes_give_the_small_window_floor(scene: Scene) -> None:
    result = scene.run(scene.l_n)
    s_early = result.geocoded["VV"][0][K // 2 : -(K // 2), K // 2 : -(K // 2)]
    looks = _enl(s_early)
    assert 15 < looks < 60
    assert np.mean(result.coherence["VV"]) == pytest.approx(math.sqrt(math.pi / (4 * looks)), rel=0.1)


def test_skipping_the_deramp_breaks_the_recovery(scene: Scene, identical: BlockResult) -> None:
    broken = scene.run(scene.l_a, deramp=False).coherence["VV"]
    assert np.percentile(identical.coherence["VV"], 5) > 0.99
    assert np.mean(broken) < 0.95 and np.percentile(broken, 5) < 0.85


# --- files and the command -----------------------------------------------------------------------


def test_card_coh_command_writes_a_tagged_cog(scene: Scene, identical: BlockResult, tmp_path: Path) -> None:
    from worker.cardgen import register

    early = write_safe(EARLY, tmp_path / "in", {"VV": scene.e_a})
    late = write_safe(LATE, tmp_path / "in", {"VV": scene.late_with(0.5)})
    app = typer.Typer()
    register(app)
    left, bottom, right, top = scene.grid.bounds
    args = ["card", "coh", str(late), str(early), "--out", str(tmp_path / "out"), "--crs", str(scene.grid.crs)]
    args += ["--bounds", str(left), str(bottom), str(right), str(top), "--resolution", "10", "--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "out").glob("*.tif")
    assert path.name.startswith(f"{EARLY.stem}_{LATE.stem}_") and path.name.endswith("_VV_COH12.tif")
    with rasterio.open(path) as ds:
        assert ds.dtypes == ("float32",) and math.isnan(ds.nodata) and ds.shape == (ROWS, COLS)
        assert ds.transform == scene.grid.transform and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        tags = ds.tags()
        values = ds.read(1)
    assert tags["GAP_DAYS"] == "12" and tags["KIND"] == "COH12" and tags["POLARISATION"] == "VV"
    assert tags["DATE_EARLY"].startswith("2025-04-06T02:20") and tags["DATE_LATE"].startswith("2025-04-18T02:20")
    assert tags["DEM"] == "flat-ellipsoid" and "7x7" in tags["WINDOW"] and "annotation" in tags["ORBIT"]
    assert np.isfinite(values).mean() > 0.99
    looks = _enl(scene.run(scene.late_with(0.5)).geocoded["VV"][0][K // 2 : -(K // 2), K // 2 : -(K // 2)])
    assert np.nanmean(values) == pytest.approx(expected_coherence(0.5 * _baseline_coherence(scene), looks), abs=0.03)
    bad = CliRunner().invoke(app, ["card", "coh", str(early), str(late), "--out", str(tmp_path), "--window", "4"])
    assert bad.exit_code == 1 and "give the output grid" in bad.output


def test_interpolated_geometry_matches_the_per_pixel_solve(scene: Scene) -> None:
    """The default geometry (Newton every 8th pixel, interpolated) against Newton at every pixel,
    on a DEM with 600 m of relief inside the block (a tilted plane plus a bump)."""

    @dataclass(frozen=True)
    class Relief:
        label: str = "relief"
        flat: bool = False

        def heights(self, box: GeoBox) -> np.ndarray:
            r, c = np.mgrid[0 : box.height, 0 : box.width]
            h: np.ndarray = 100.0 + 1.5 * r + 200.0 * np.exp(-((r - 150) ** 2 + (c - 75) ** 2) / 2000.0)
            return h

    readers = {("early", "IW2", "VV"): scene.e_a.reader(), ("late", "IW2", "VV"): scene.l_a.reader()}
    fast = CohProcessor(scene.early, scene.late, scene.grid, Relief(), K, readers=readers)
    exact = CohProcessor(scene.early, scene.late, scene.grid, Relief(), K, readers=readers, geometry_stride_px=1)
    box = scene.grid.shifted(rows=-3, cols=-3, shape=(ROWS + 6, COLS + 6))
    t_e, r_e, t_l, r_l = fast._geometry(box)
    u_e, q_e, u_l, q_l = exact._geometry(box)
    assert np.abs(t_e - u_e).max() < 1e-7 and np.abs(t_l - u_l).max() < 1e-7  # s (a line is 2 ms)
    assert np.abs(r_e - q_e).max() < 1e-3 and np.abs(r_l - q_l).max() < 1e-3  # m (a sample is 2.3 m)
    # what the interferogram sees: the difference of the two dates' range errors, in radians
    lam = scene.early.swaths[("IW2", "VV")].wavelength_m
    assert 4 * np.pi * np.abs((r_e - q_e) - (r_l - q_l)).max() / lam < 0.01


def test_footprint_holds_every_geolocation_point_and_names_the_tiles() -> None:
    require_pair()
    from shapely.geometry import Point, Polygon

    from card.mgrs import tiles_intersecting

    product = open_slc(EARLY)
    ring = product.footprint_lonlat()
    assert ring[0] == ring[-1] and len(ring) >= 5
    hull = Polygon(ring)
    sw = product.swaths[("IW2", "VV")]
    assert all(hull.buffer(1e-9).contains(Point(lo, la)) for lo, la in zip(sw.grid.lon, sw.grid.lat, strict=True))
    assert hull.area == pytest.approx(Polygon(list(zip(sw.grid.lon, sw.grid.lat, strict=True))).convex_hull.area)
    assert {"09UWT", "09UXT"} <= set(tiles_intersecting(ring))


def test_sub_swath_overlap_takes_each_pixel_from_one_swath_without_a_seam() -> None:
    """No IW1/IW3 annotation is public: a second sub-swath is IW2's own annotation moved 23 000
    samples out in range (same bursts), so the two overlap by ~1 350 samples (≈ 5 km on the
    ground). The range rule must split the overlap, each pixel from one swath, and γ = 1 data must
    come out at the single-swath value on both sides of the cut."""
    require_pair()
    shift = 23000
    products = []
    for path in (EARLY, LATE):
        p = open_slc(path, ("VV",), ("IW2",))
        sw = p.swaths[("IW2", "VV")]
        far = replace(sw, swath="IW3", slant_range_time_s=sw.slant_range_time_s + shift / sw.range_sampling_rate_hz)
        products.append(replace(p, swaths={("IW2", "VV"): sw, ("IW3", "VV"): far}))
    early, late = products
    se = early.swaths[("IW2", "VV")]
    # the middle of the overlap (the grid's lat/lon are at the annotation's terrain height, ours at 0 m)
    cut = 0.5 * (shift + se.bursts[4].valid_samples[0] + se.bursts[4].valid_samples[1])
    g = se.grid
    on_line = g.line == se.bursts[5].first_line  # a geolocation grid line (burst 5's first line)
    order = np.argsort(g.pixel[on_line])
    lon = float(np.interp(cut, g.pixel[on_line][order], g.lon[on_line][order]))
    lat = float(np.interp(cut, g.pixel[on_line][order], g.lat[on_line][order]))
    crs = f"EPSG:{32600 + int((lon + 180) // 6) + 1}"
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    rows, cols = 80, 200
    grid = GeoBox(
        (rows, cols), Affine(10.0, 0.0, round(x / 10) * 10 - cols * 5, 0.0, -10.0, round(y / 10) * 10 + rows * 5), crs
    )
    rng = np.random.default_rng(5)
    field = syn.scatterers(grid.shifted(rows=-15, cols=-15, shape=(rows + 30, cols + 30)), 5.0, rng)
    a = syn.complex_gaussian(len(field.x), rng)
    readers = {}
    for name, product in (("early", early), ("late", late)):
        for key, sw in product.swaths.items():
            readers[(name, key[0], "VV")] = syn.simulate(
                sw, field.points, a, *scatterer_window(sw, field.points)
            ).reader()
    result = CohProcessor(early, late, grid, FlatDem(), K, readers=readers).process_block(
        slice(0, rows), slice(0, cols)
    )
    src = result.source[K // 2 : -(K // 2), K // 2 : -(K // 2)] // 1000  # swath number 0 (IW2) or 1 (IW3)
    assert set(np.unique(src)) == {0, 1} and min((src == 0).mean(), (src == 1).mean()) > 0.1
    coh = result.coherence["VV"]
    assert np.isfinite(coh).all() and coh.mean() >= 0.99
    col_mean = coh.mean(axis=0)
    mixed = np.flatnonzero([(c == 0).any() and (c == 1).any() for c in src.T])
    near = np.abs(np.arange(cols)[:, None] - mixed[None, :]).min(axis=1) <= K
    assert abs(col_mean[near].mean() - col_mean[~near].mean()) < 0.002
