"""POEORB orbit files: parsed in their real shape, and geocoding with one equals the annotation's orbit.

The EOF files are written here in the shape of ESA's ``S1B_OPER_AUX_POEORB_OPOD_…EOF`` (Earth
Explorer header, 10 s OSVs with TAI/UTC/UT1 tags, Absolute_Orbit, X…VZ with units, Quality), their
state vectors sampled from the annotation's own trajectory at other instants than its vectors:
the truth is that the two orbits are the same curve.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer

from card.geobox import GeoBox
from card.s1grd.bs import generate_bs
from card.s1grd.dem import FlatDem
from card.s1grd.geocode import Geocoder, ecef
from card.s1grd.orbit import OrbitInterpolator, read_orbit_file, with_orbit_file
from card.s1grd.safe import GrdProduct, SafeError, open_grd

SAFE = Path("../shared/data/sentinel1/S1B_IW_GRDH_1SDV_20211223T051122_20211223T051147_030148_039993_5371.SAFE")
EOF_NAME = "S1B_OPER_AUX_POEORB_OPOD_20220112T111601_V20211222T225942_20211224T005942"


@pytest.fixture(scope="module")
def grd() -> GrdProduct:
    if not SAFE.is_dir():
        pytest.skip(f"shared test data missing: {SAFE}")
    return open_grd(SAFE)


def _utc(t: np.datetime64) -> str:
    return str(t.astype("datetime64[us]"))


def write_eof(
    grd: GrdProduct,
    *,
    offset_s: float = 3.0,
    time_shift_s: float = 0.0,
    mission: str = "Sentinel-1B",
    validity: tuple[str, str] = ("2021-12-22T22:59:42", "2021-12-24T00:59:42"),
    frame: str = "EARTH_FIXED",
) -> bytes:
    """An EOF whose 10 s OSVs lie on the annotation's trajectory, ``offset_s`` after its own vectors.

    ``time_shift_s`` labels every vector that much later than the instant it was sampled at.
    """
    ann = grd.polarisations["VV"].annotation
    orbit = OrbitInterpolator(ann.orbit)
    # whole microseconds, as the files have them, so that the labels are the sampled instants
    first = (ann.t0 + np.timedelta64(round((ann.orbit.t[0] + offset_s) * 1e9), "ns")).astype("datetime64[us]")
    instants = first + np.arange(0, ann.orbit.t[-1] - ann.orbit.t[0] - offset_s, 10.0).astype(int) * np.timedelta64(
        1, "s"
    )
    t = (instants - ann.t0) / np.timedelta64(1, "ns") * 1e-9
    pos, vel, _ = orbit.state(t)
    osvs = []
    for k, instant in enumerate(instants):
        utc = instant + np.timedelta64(round(time_shift_s * 1e9), "ns")
        tai = utc + np.timedelta64(37, "s")
        x, y, z = pos[k]
        vx, vy, vz = vel[k]
        osvs.append(
            f"""    <OSV>
      <TAI>TAI={_utc(tai)}</TAI>
      <UTC>UTC={_utc(utc)}</UTC>
      <UT1>UT1={_utc(utc - np.timedelta64(180, "ms"))}</UT1>
      <Absolute_Orbit>+30148</Absolute_Orbit>
      <X unit="m">{x:.6f}</X>
      <Y unit="m">{y:.6f}</Y>
      <Z unit="m">{z:.6f}</Z>
      <VX unit="m/s">{vx:.6f}</VX>
      <VY unit="m/s">{vy:.6f}</VY>
      <VZ unit="m/s">{vz:.6f}</VZ>
      <Quality>NOMINAL</Quality>
    </OSV>
"""
        )
    return f"""<?xml version="1.0" ?>
<Earth_Explorer_File>
  <Earth_Explorer_Header>
    <Fixed_Header>
      <File_Name>{EOF_NAME}</File_Name>
      <File_Description>Precise Orbit Ephemerides (POE) Orbit File</File_Description>
      <Notes></Notes>
      <Mission>{mission}</Mission>
      <File_Class>OPER</File_Class>
      <File_Type>AUX_POEORB</File_Type>
      <Validity_Period>
        <Validity_Start>UTC={validity[0]}</Validity_Start>
        <Validity_Stop>UTC={validity[1]}</Validity_Stop>
      </Validity_Period>
      <File_Version>0001</File_Version>
      <Source>
        <System>OPOD</System>
        <Creator>OPOD</Creator>
        <Creator_Version>3.1.0</Creator_Version>
        <Creation_Date>UTC=2022-01-12T11:16:01</Creation_Date>
      </Source>
    </Fixed_Header>
    <Variable_Header>
      <Ref_Frame>{frame}</Ref_Frame>
      <Time_Reference>UTC</Time_Reference>
    </Variable_Header>
  </Earth_Explorer_Header>
<Data_Block type="xml">
  <List_of_OSVs count="{len(osvs)}">
{"".join(osvs)}  </List_of_OSVs>
</Data_Block>
</Earth_Explorer_File>
""".encode()


def test_reads_the_eof_shape(grd: GrdProduct, tmp_path: Path) -> None:
    eof = read_orbit_file(write_eof(grd))
    assert (eof.name, eof.mission, eof.kind) == (EOF_NAME, "Sentinel-1B", "POEORB")
    assert eof.utc.size == 15 and np.all(np.diff(eof.utc) == np.timedelta64(10, "s"))
    assert eof.label.startswith("POEORB S1B_OPER_AUX_POEORB_OPOD_")
    zipped = tmp_path / f"{EOF_NAME}.EOF.zip"  # as the orbit services hand them out
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{EOF_NAME}.EOF", write_eof(grd))
    assert np.array_equal(read_orbit_file(zipped).pos, eof.pos)


def test_poeorb_on_the_same_trajectory_geocodes_like_the_annotation(grd: GrdProduct) -> None:
    a = grd.polarisations["VV"].annotation
    g = a.grid
    points = ecef(g.lon, g.lat, g.height)
    ref = Geocoder(a).radar_position(points)
    # the annotation's own instants: the same curve exactly
    same = Geocoder(with_orbit_file(grd, read_orbit_file(write_eof(grd, offset_s=0.0))).polarisations["VV"].annotation)
    pos = same.radar_position(points)
    assert np.max(np.abs(pos.line - ref.line)) < 1e-6 and np.max(np.abs(pos.pixel - ref.pixel)) < 1e-6
    # other instants (3 s later): positions agree to 0.3 mm, velocities to 1e-4 m/s, and a velocity
    # direction off by 1e-4/7600 rad moves zero Doppler by ~1 cm at 850 km: ~1e-3 line
    with_poe = with_orbit_file(grd, read_orbit_file(write_eof(grd)))
    b = with_poe.polarisations["VV"].annotation
    assert not np.array_equal(b.orbit.t, a.orbit.t)  # other nodes: the file's vectors are in use
    poe = Geocoder(b).radar_position(points)
    assert np.max(np.abs(poe.line - ref.line)) < 3e-3
    assert np.max(np.abs(poe.pixel - ref.pixel)) < 1e-3
    # and the annotation's geolocation grid is still met (the target, on the POEORB orbit)
    assert np.max(np.abs(poe.pixel - g.pixel)) <= 0.05 and np.max(np.abs(poe.line - g.line)) <= 0.05


def test_eof_times_are_used_a_line_later_is_a_line_later(grd: GrdProduct) -> None:
    a = grd.polarisations["VV"].annotation
    g = a.grid
    points = ecef(g.lon, g.lat, g.height)
    ref = Geocoder(a).radar_position(points)
    shift_s = 0.001496  # about one line (1.49657 ms), in the files' whole microseconds
    late = with_orbit_file(grd, read_orbit_file(write_eof(grd, offset_s=0.0, time_shift_s=shift_s)))
    pos = Geocoder(late.polarisations["VV"].annotation).radar_position(points)
    assert np.allclose(pos.line - ref.line, shift_s / a.azimuth_time_interval_s, rtol=0, atol=1e-5)
    assert np.max(np.abs(pos.pixel - ref.pixel)) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mission": "Sentinel-1A"}, "is for Sentinel-1A, the product is S1B"),
        ({"validity": ("2021-12-23T06:00:00", "2021-12-24T06:00:00")}, "is valid"),
        ({"frame": "INERTIAL"}, "EARTH_FIXED expected"),
    ],
)
def test_a_wrong_orbit_file_is_refused(grd: GrdProduct, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SafeError, match=message):
        with_orbit_file(grd, read_orbit_file(write_eof(grd, **kwargs)))  # type: ignore[arg-type]


def test_generate_bs_with_an_orbit_file_tags_poeorb_and_gives_the_same_values(grd: GrdProduct, tmp_path: Path) -> None:
    g = grd.polarisations["VV"].annotation.grid
    lon, lat = float(np.median(g.lon)), float(np.median(g.lat))
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True).transform(lon, lat)
    grid = GeoBox((48, 48), Affine(10, 0, round(x, -1), 0, -10, round(y, -1)), "EPSG:32633")

    def ramp(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:  # DN encodes the pixel index
        return np.broadcast_to(np.arange(c0, c1, dtype=np.float64) % 4000 + 1, (r1 - r0, c1 - c0)).copy()

    eof_path = tmp_path / f"{EOF_NAME}.EOF"
    eof_path.write_bytes(write_eof(grd))
    kw = {"quantity": "beta0", "denoise": False, "readers": {"VV": ramp}}
    plain = generate_bs(str(SAFE), grid, FlatDem(), str(tmp_path / "a"), **kw)  # type: ignore[arg-type]
    poe = generate_bs(str(SAFE), grid, FlatDem(), str(tmp_path / "p"), orbit_file=eof_path, **kw)  # type: ignore[arg-type]
    with rasterio.open(plain.backscatter["VV"]) as a, rasterio.open(poe.backscatter["VV"]) as b:
        va, vb = a.read(1), b.read(1)
        assert a.tags()["ORBIT"] == "annotation state vectors (Hermite)"
        assert b.tags()["ORBIT"] == f"POEORB {EOF_NAME} (Hermite)"
    assert np.isfinite(va).all() and np.allclose(va, vb, rtol=1e-5)
