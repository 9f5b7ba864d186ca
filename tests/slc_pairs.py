"""The real 12-day IW2 SLC pair of ``../shared`` as synthetic test products: scatterers projected
through each date's own annotation (:mod:`card.s1slc.synthetic`), and SAFE directories holding the
real manifest and annotation with a sparse measurement of just the simulated window. Shared by the
coherence physics tests (tests/unit/test_card_coh.py) and the job's (tests/integration/
test_card_coh_job.py), so both build their products the same way."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.errors
import rasterio.windows

PAIR = Path("../shared/data/sentinel1/coh-pair")
EARLY = PAIR / "S1A_IW_SLC__1SDV_20250406T022008_20250406T022035_058630_07421F_93A7.SAFE"
LATE = PAIR / "S1A_IW_SLC__1SDV_20250418T022008_20250418T022035_058805_074946_C7D4.SAFE"
C = 299792458.0


def require_pair() -> None:
    if not EARLY.is_dir() or not LATE.is_dir():
        pytest.skip(f"shared test data missing: {PAIR}")


def scatterer_window(swath: Any, points: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """Measurement rows/cols the scatterers fall on (all bursts), with a margin for the kernels
    (the generator's own zero-Doppler solve)."""
    from card.s1grd.orbit import OrbitInterpolator
    from card.s1slc import synthetic as syn

    t, r = syn.zero_doppler(OrbitInterpolator(swath.orbit), points, swath.bursts[4].azimuth_time_s)
    sample = (2 * r / C - swath.slant_range_time_s) * swath.range_sampling_rate_hz
    rows: list[int] = []
    for b in swath.bursts:
        line = (t - b.azimuth_time_s) / swath.azimuth_time_interval_s
        if ((line > 0) & (line < b.lines)).any():
            rows += [b.first_line + max(0, int(line.min()) - 10), b.first_line + min(b.lines, int(line.max()) + 10)]
    return (min(rows), max(rows)), (int(sample.min()) - 10, int(sample.max()) + 10)


def write_safe(src: Path, dst: Path, data: dict[str, Any]) -> Path:
    """A SAFE directory: the real manifest and IW2 annotation per polarisation of ``data``, and
    per polarisation a sparse complex-int16 measurement holding the synthetic window (the rest of
    the swath is 0, i.e. no signal)."""
    safe = dst / src.name
    (safe / "annotation").mkdir(parents=True)
    (safe / "measurement").mkdir()
    (safe / "manifest.safe").write_bytes((src / "manifest.safe").read_bytes())
    for pol, swath in data.items():
        xml = next((src / "annotation").glob(f"s1a-iw2-slc-{pol.lower()}-*.xml"))
        (safe / "annotation" / xml.name).write_bytes(xml.read_bytes())
        sw = swath.swath
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(
                safe / "measurement" / (xml.stem + ".tiff"),
                "w",
                driver="GTiff",
                width=sw.n_samples,
                height=sw.n_lines,
                count=1,
                dtype="complex_int16",
                tiled=True,
                blockxsize=256,
                blockysize=256,
                sparse_ok=True,
            ) as ds:
                ny, nx = swath.data.shape
                ds.write(np.round(swath.data), 1, window=rasterio.windows.Window(swath.col0, swath.row0, nx, ny))
    return safe
