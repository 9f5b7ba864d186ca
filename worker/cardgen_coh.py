"""``cbmflow card coh``: two Sentinel-1 IW SLCs of one relative orbit → CARD-COH COGs, without a queue.

The physics lives in :mod:`card.s1slc`; this module turns options into grids (``--tile`` or
``--crs/--bounds/--resolution``, resolved as ``cbmflow card bs`` does) and a DEM provider, calls
:func:`card.s1slc.coh.generate_coh` per grid, and turns errors into one line. Local SAFE
directories or zips only (S3 inputs: the GenerateCard job stages them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cbmflow import __version__

if TYPE_CHECKING:
    from card.geobox import GeoBox
    from card.s1grd.dem import Dem

DEM_HELP = (
    "'flat' (height 0 on the WGS84 ellipsoid), 'glo30' (Copernicus GLO-30 tiles from S3, cached) or a DEM raster."
)


# The grid and DEM options mirror worker/cardgen.py's (``output_grids``, ``make_dem``); they are
# repeated here because worker/cardgen.py registers this command (an import back would be a cycle).
def _grids(
    tiles: list[str], crs: str | None, bounds: tuple[float, float, float, float] | None, resolution_m: float | None
) -> list[tuple[str | None, GeoBox]]:
    from affine import Affine

    from card.geobox import GeoBox
    from card.mgrs import parse_tile

    if tiles and (crs is not None or bounds is not None):
        raise ValueError("give either --tile or --crs/--bounds, not both")
    if tiles:
        return [(t.name, t.geobox(resolution_m or 10.0)) for t in map(parse_tile, tiles)]
    if crs is None or bounds is None:
        raise ValueError("give the output grid: --tile 32UPU or --crs EPSG:N --bounds XMIN YMIN XMAX YMAX")
    res = resolution_m or 10.0
    xmin, ymin, xmax, ymax = bounds
    if not (xmax > xmin and ymax > ymin and res > 0):
        raise ValueError(f"bounds must be XMIN YMIN XMAX YMAX with XMAX > XMIN, YMAX > YMIN; got {bounds}")
    x0, y1 = math.floor(xmin / res) * res, math.ceil(ymax / res) * res
    shape = (math.ceil((y1 - ymin) / res), math.ceil((xmax - x0) / res))
    return [(None, GeoBox(shape, Affine(res, 0.0, x0, 0.0, -res, y1), crs.upper()))]


def _dem(dem: str, geoid: str | None, bucket: str, cache: Path | None) -> Dem:
    from card.s1grd.dem import GLO30_AWS, FileDem, FlatDem, Glo30Dem

    if dem == "flat":
        return FlatDem()
    if dem == "glo30":
        client: Any
        if bucket.rstrip("/") == GLO30_AWS:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            client = boto3.client("s3", region_name="eu-central-1", config=Config(signature_version=UNSIGNED))
        else:
            from cbmflow import store

            client = store.s3_client()
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return Glo30Dem(client, cache or home / "cbmflow" / "glo30", bucket, geoid=geoid)
    if not Path(dem).is_file():
        raise FileNotFoundError(f"DEM {dem} not found")
    return FileDem(Path(dem), geoid)


def register_coh(card_app: typer.Typer) -> None:
    @card_app.command("coh")
    def coh_cmd(
        slc_early: Path = typer.Argument(..., help="Sentinel-1 IW SLC (.SAFE directory or .zip), one date."),
        slc_late: Path = typer.Argument(..., help="The other date on the same relative orbit (order does not matter)."),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        dem: str = typer.Option("flat", "--dem", help=DEM_HELP),
        dem_geoid: str | None = typer.Option(
            None, "--dem-geoid", help="Geoid of the DEM heights: 'egm96' or 'egm2008' (a file DEM: else ellipsoidal)."
        ),
        dem_bucket: str = typer.Option("s3://copernicus-dem-30m", "--dem-bucket", help="Where the GLO-30 tiles are."),
        dem_cache: Path | None = typer.Option(None, "--dem-cache", help="Local GLO-30 tile cache."),
        tile: list[str] = typer.Option([], "--tile", help="Sentinel-2 tile(s), e.g. 32UPU: its grid (repeatable)."),
        crs: str | None = typer.Option(None, "--crs", help="Output CRS, e.g. EPSG:32633 (instead of --tile)."),
        bounds: tuple[float, float, float, float] | None = typer.Option(
            None, "--bounds", help="XMIN YMIN XMAX YMAX in --crs units."
        ),
        resolution: float | None = typer.Option(None, "--resolution", help="Pixel size in metres (default 10)."),
        window: int = typer.Option(7, "--window", help="Coherence boxcar, odd number of output pixels per side."),
        polarisation: list[str] = typer.Option([], "--pol", help="Polarisations (default: all both products hold)."),
        swath: list[str] = typer.Option([], "--swath", help="Sub-swaths, e.g. IW2 (default: all both products hold)."),
        workers: int = typer.Option(1, "--workers", help="Threads processing output blocks."),
    ) -> None:
        """n-day interferometric coherence (COHn, n = the gap in days): one COG per polarisation and grid."""
        from card.s1grd.safe import SafeError
        from card.s1slc.coh import generate_coh

        def fail(message: str) -> typer.Exit:
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            return typer.Exit(1)

        try:
            grids = _grids(tile, crs, bounds, resolution)
            provider = _dem(dem, dem_geoid, dem_bucket, dem_cache)
            for name, grid in grids:
                result = generate_coh(
                    str(slc_early),
                    str(slc_late),
                    grid,
                    provider,
                    str(out),
                    window_px=window,
                    polarisations=tuple(p.upper() for p in polarisation) or None,
                    swaths=tuple(s.upper() for s in swath) or None,
                    workers=workers,
                    name=name,
                    software=f"cbmflow {__version__}",
                )
                for pol, path in result.coherence.items():
                    typer.echo(f"{pol}\t{path}")
                rate = result.pixels / result.seconds if result.seconds > 0 else float("inf")
                typer.echo(
                    f"COH{result.gap_days}: {result.pixels} pixels in {result.seconds:.1f} s ({rate:,.0f} pixels/s)",
                    err=True,
                )
        except (SafeError, FileNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from exc
