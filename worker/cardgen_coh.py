"""``cbmflow card coh``: two Sentinel-1 IW SLCs of one relative orbit → CARD-COH COGs, without a queue.

The physics lives in :mod:`card.s1slc`; this module turns options into grids (``--tile`` or
``--crs/--bounds/--resolution``, resolved as ``cbmflow card bs`` does) and a DEM provider, calls
:func:`card.s1slc.coh.generate_coh` per grid, and turns errors into one line. Local SAFE
directories or zips only (S3 inputs: the GenerateCard job stages them).
"""

from __future__ import annotations

from pathlib import Path

import typer

from cbmflow import __version__
from worker.cardopts import DEM_HELP, make_dem, output_grids


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
            grids = output_grids(tile, crs, bounds, resolution)
            provider = make_dem(dem, dem_geoid, dem_bucket, dem_cache)
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
