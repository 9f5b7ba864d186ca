"""The Sentinel-1 CARD reader (``card/s1.py``) on both layouts, cbmflow's CARD COG and JRC's
BEAM-DIMAP archive, including every way a product can be unusable; and the generator's S1 world
(its truth, determinism and catalogue) read by the watcher's own STAC code. No servers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely.geometry
from rasterio.crs import CRS
from s1_products import _card, _read_pol, _truth, _write_tif, to_dimap

from card.s1 import MissingPolarisationError, open_s1_card
from card.testworld import WorldSummary, generate
from catalog_watcher.stac import iter_scenes

ALL_COLLECTIONS = ["sentinel-2-l2a", "sentinel-1-card-bs", "sentinel-1-card-c6"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldSummary:
    return generate(tmp_path_factory.mktemp("s1world"), parcels=60, scenes=1, seed=21, s1_scenes=4, c6_scenes=2)


# ------------------------------------------------------------------------------------------
# The reader
# ------------------------------------------------------------------------------------------


def test_reader_finds_polarisations_by_band_description(world: WorldSummary) -> None:
    assert len(world.s1_products) == 6
    assert [_card(n) for n in world.s1_products] == ["bs"] * 4 + ["c6"] * 2
    for name, tif in zip(world.s1_products, world.s1_product_paths, strict=True):
        product = open_s1_card(tif)
        assert (product.product_name, product.layout, product.epsg, product.crs) == (
            name,
            "geotiff",
            32632,
            "EPSG:32632",
        )
        # The generator writes coherence VH first: the index must follow the descriptions.
        want = {"VV": 1, "VH": 2} if _card(name) == "bs" else {"VV": 2, "VH": 1}
        assert {b.polarisation: b.band for b in product.bands} == want
        assert {b.path for b in product.bands} == {str(tif)}
        assert all(b.nodata is None for b in product.bands)  # NaN only
        with rasterio.open(tif) as src:
            assert src.dtypes == ("float32", "float32") and math.isnan(src.nodata)
            assert src.tags()["CARD"] == ("CARD-BS" if _card(name) == "bs" else "CARD-COH6")


def test_reader_refuses_what_it_cannot_identify(world: WorldSummary, tmp_path: Path) -> None:
    tif = world.s1_product_paths[0]
    pols = _read_pol(tif)

    vv_only = tmp_path / "vv_only.tif"
    _write_tif(vv_only, [("VV", pols["VV"])], tif)
    with pytest.raises(MissingPolarisationError) as missing:
        open_s1_card(vv_only)
    assert isinstance(missing.value, FileNotFoundError) and missing.value.polarisation == "VH"
    assert "polarisation VH" in str(missing.value) and "vv_only.tif" in str(missing.value)
    assert open_s1_card(vv_only, ("VV",)).band("VV").band == 1  # asking for VV only is fine
    with pytest.raises(MissingPolarisationError):
        open_s1_card(vv_only, ("VV",)).band("VH")

    undescribed = tmp_path / "undescribed.tif"
    _write_tif(undescribed, [("", pols["VV"]), ("", pols["VH"])], tif)
    with pytest.raises(ValueError, match="no description"):
        open_s1_card(undescribed)

    half = tmp_path / "half.tif"  # VV described, the other band not: which one is VH is unknown
    _write_tif(half, [("VV", pols["VV"]), ("", pols["VH"])], tif)
    with pytest.raises(ValueError, match="VH band cannot be identified"):
        open_s1_card(half)

    twice = tmp_path / "twice.tif"
    _write_tif(twice, [("VV", pols["VV"]), ("VV", pols["VH"])], tif)
    with pytest.raises(ValueError, match="described as VV"):
        open_s1_card(twice)

    scaled = tmp_path / "uint16.tif"  # e.g. DN-scaled dB: not the CARD format
    _write_tif(scaled, [(p, np.nan_to_num(pols[p]) * 1000) for p in ("VV", "VH")], tif, dtype="uint16")
    with pytest.raises(ValueError, match="uint16, a CARD raster must be float32"):
        open_s1_card(scaled)

    described = tmp_path / "gamma0_names.tif"  # SNAP-style descriptions are understood
    _write_tif(described, [("Gamma0_VH", pols["VH"]), ("Gamma0_VV", pols["VV"])], tif)
    assert {b.polarisation: b.band for b in open_s1_card(described).bands} == {"VV": 2, "VH": 1}

    with pytest.raises(FileNotFoundError):
        open_s1_card(tmp_path / "nowhere.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(ValueError, match="cannot read raster"):
        open_s1_card(broken)


def test_reader_accepts_jrc_beam_dimap(world: WorldSummary, tmp_path: Path) -> None:
    tif = world.s1_product_paths[1]
    root = to_dimap(tif, tmp_path / "bs")
    ref = tif.stem
    for given in (root, root / f"{ref}.dim", root / f"{ref}.data"):
        product = open_s1_card(given)
        assert (product.product_name, product.layout, product.epsg) == (ref, "dimap", 32632)
        assert {b.polarisation: Path(b.path).name for b in product.bands} == {
            "VV": "Gamma0_VV.img",
            "VH": "Gamma0_VH.img",
        }
        assert all(b.band == 1 and b.nodata == 0.0 for b in product.bands)

    # Coherence: files named with _VV/_VH, found by name when there is no .dim; SNAP's 0.0 no-data.
    coh = to_dimap(
        world.s1_product_paths[4],
        tmp_path / "c6",
        names={"VV": "coh_IW2_VV_03May2024_09May2024", "VH": "coh_IW2_VH_03May2024_09May2024"},
        dim=False,
    )
    product = open_s1_card(coh)
    assert {b.polarisation: Path(b.path).name for b in product.bands} == {
        "VV": "coh_IW2_VV_03May2024_09May2024.img",
        "VH": "coh_IW2_VH_03May2024_09May2024.img",
    }
    assert all(b.nodata == 0.0 for b in product.bands)

    data = root / f"{ref}.data"
    (data / "Gamma0_VH.hdr").unlink()
    with pytest.raises(MissingPolarisationError, match="VH.*no ENVI header"):
        open_s1_card(root)
    (data / "Gamma0_VH.img").unlink()
    with pytest.raises(MissingPolarisationError, match="polarisation VH.*Gamma0_VH is listed but its file is missing"):
        open_s1_card(root)
    (root / f"{ref}.dim").unlink()  # without the .dim, the .data directory is all there is
    with pytest.raises(MissingPolarisationError, match="polarisation VH has no band file"):
        open_s1_card(root)
    assert open_s1_card(root, ("VV",)).band("VV").nodata == 0.0

    ambiguous = to_dimap(tif, tmp_path / "amb", names={"VV": "Sigma0_VV", "VH": "Beta0_VV"}, dim=False)
    with pytest.raises(ValueError, match="2 bands could be VV"):
        open_s1_card(ambiguous)
    with pytest.raises(FileNotFoundError):
        open_s1_card(tmp_path / "nothing" / "x.dim")


def test_counts_are_per_grid_and_per_card(world: WorldSummary) -> None:
    """The truth itself: bs (10 m) and c6 (20 m) rows differ in count as their grids do, and every
    S1 value the truth averaged is finite and in range (linear backscatter > 0, coherence in [0, 1])."""
    truth = _truth(world.truth_path)
    by_card: dict[str, list[int]] = defaultdict(list)
    for (_, product, _), (count, mean) in truth.items():
        if product in world.s1_products:
            by_card[_card(product)].append(count)
            assert math.isfinite(mean) and mean > 0
            if _card(product) == "c6":
                assert mean <= 1
            else:
                assert mean < 1  # linear, not dB
    assert np.median(by_card["bs"]) > 3 * np.median(by_card["c6"])
    for tif in world.s1_product_paths:
        with rasterio.open(tif) as src:
            assert src.crs == CRS.from_epsg(32632)
            data = src.read()
        assert np.isnan(data).any() and np.isfinite(data).mean() > 0.9


def test_s1_world_is_deterministic_catalogued_and_leaves_s2_alone(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", parcels=20, scenes=1, seed=4, s1_scenes=2, c6_scenes=1)
    b = generate(tmp_path / "b", parcels=20, scenes=1, seed=4, s1_scenes=2, c6_scenes=1)
    plain = generate(tmp_path / "c", parcels=20, scenes=1, seed=4)
    assert a.s1_products == b.s1_products and len(a.s1_products) == 3 and plain.s1_products == ()
    for pa, pb in zip(a.s1_product_paths, b.s1_product_paths, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    # Asking for S1 changes nothing of the S2 part: same SAFE bytes, the S2 truth rows first, as they were.
    for safe in plain.product_paths:
        for f in sorted(p for p in safe.rglob("*") if p.is_file()):
            assert f.read_bytes() == (a.out / "products" / safe.name / f.relative_to(safe)).read_bytes()
    plain_truth = plain.truth_path.read_text()
    assert a.truth_path.read_text().startswith(plain_truth) and a.truth_rows > plain.truth_rows

    # The catalogue is read by the watcher's own code: card from the collection, location = the COG.
    aoi = shapely.geometry.shape(json.loads(a.aoi_path.read_text())["features"][0]["geometry"])
    records = list(iter_scenes(str(a.stac_catalog_path), ALL_COLLECTIONS, aoi, lookback_days=0))
    s1 = {r.product_id: r for r in records if r.card != "s2"}
    assert set(s1) == set(a.s1_products)
    for name, tif in zip(a.s1_products, a.s1_product_paths, strict=True):
        rec = s1[name]
        assert (rec.card, rec.mission, rec.sensor, rec.location) == (_card(name), "S1A", "IW", str(tif.resolve()))
        assert rec.footprint.intersects(aoi) and not rec.footprint.contains(aoi), "a swath edge crosses the AOI"
    s2_only = list(iter_scenes(str(a.stac_catalog_path), ["sentinel-2-l2a"], aoi, lookback_days=0))
    assert [r.card for r in s2_only] == ["s2"], "the default watch sees no S1"
