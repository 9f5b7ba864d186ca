"""``cbmflow card bs``: a Sentinel-1 GRD → CARD-BS COGs on a map grid, without a database or a queue.

The physics lives in :mod:`card.s1grd`; this module only turns options into grids, a DEM provider,
an orbit and a call, and errors into one line. The grid is one or more Sentinel-2 tiles
(``--tile 32UPU``, the S2 10 m grid unless ``--resolution`` says 20, 60 …) or ``--crs/--bounds/
--resolution`` (snapped outwards to whole pixels). Inputs on S3 (``s3://bucket/…SAFE`` or a zip)
and a GLO-30 bucket other than AWS's public one are read through the object store's settings
(``CBMFLOW_STORE_*``), as the worker reads scenes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cbmflow import __version__
from worker.cardopts import DEM_HELP, make_dem, output_grids

QUANTITY_HELP = "gamma0-rtc (terrain-flattened), gamma0 (ellipsoid, JRC's Gamma0), sigma0 or beta0."


BLOCK_GROUND_M = 5120.0
"""Output blocks span ~5 km whatever the pixel size: a block's radar window (its memory and the
calibration work) grows with its ground extent, so a 512-pixel block at 360 m would pull in the
whole scene."""


def block_px(resolution_m: float) -> int:
    return max(32, min(512, round(BLOCK_GROUND_M / resolution_m)))


def local_gdal_env() -> Any:
    """One rasterio environment for the whole run on local files: without it every open builds its
    own, and with AWS keys in the environment each of those is a boto3 session (~40 ms apiece)."""
    import rasterio
    from rasterio.session import DummySession

    return rasterio.Env(session=DummySession())


def register(app: typer.Typer) -> None:
    card_app = typer.Typer(help="Generate CARD (analysis-ready) rasters from Copernicus inputs.", no_args_is_help=True)
    app.add_typer(card_app, name="card")
    from worker.cardgen_coh import register_coh  # CARD-COH (issue 13): `cbmflow card coh`

    register_coh(card_app)

    @card_app.command("bs")
    def bs_cmd(
        source: str = typer.Argument(
            ..., help="Sentinel-1 GRD: the .SAFE directory or its .zip (also CDSE's …_COG.SAFE), local or s3://…"
        ),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        dem: str = typer.Option("flat", "--dem", help=DEM_HELP),
        dem_geoid: str | None = typer.Option(
            None,
            "--dem-geoid",
            help="Geoid of the DEM heights: 'egm96' or 'egm2008' (a file DEM: else ellipsoidal; glo30: its grid"
            " if installed, else egm96).",
        ),
        dem_bucket: str = typer.Option(
            "s3://copernicus-dem-30m",
            "--dem-bucket",
            help="Where the GLO-30 tiles are: s3://bucket or s3://bucket/prefix (CDSE: s3://eodata/auxdata/CopDEM_COG/copernicus-dem-30m).",
        ),
        dem_cache: Path | None = typer.Option(
            None, "--dem-cache", help="Local GLO-30 tile cache (default ~/.cache/cbmflow/glo30)."
        ),
        tile: list[str] = typer.Option([], "--tile", help="Sentinel-2 tile(s), e.g. 32UPU: its grid (repeatable)."),
        crs: str | None = typer.Option(None, "--crs", help="Output CRS, e.g. EPSG:32633 (instead of --tile)."),
        bounds: tuple[float, float, float, float] | None = typer.Option(
            None, "--bounds", help="XMIN YMIN XMAX YMAX in --crs units."
        ),
        resolution: float | None = typer.Option(
            None, "--resolution", help="Pixel size in metres (default 10; with --tile 10, 20, 60 … dividing 109 800)."
        ),
        quantity: str = typer.Option("gamma0-rtc", "--quantity", help=QUANTITY_HELP),
        no_denoise: bool = typer.Option(False, "--no-denoise", help="Keep the thermal noise (not recommended)."),
        polarisation: list[str] = typer.Option([], "--pol", help="Polarisations (default: all in the product)."),
        orbit: Path | None = typer.Option(
            None, "--orbit", help="POEORB (or RESORB) .EOF file; default: the annotation's state vectors."
        ),
        workers: int = typer.Option(
            0, "--workers", min=0, help="Threads processing output blocks (0: one per CPU); same output for any number."
        ),
    ) -> None:
        """Calibrated, noise-removed, geocoded (and terrain-flattened) backscatter: a COG per polarisation and grid."""
        from botocore.exceptions import BotoCoreError, ClientError

        from card.s1grd.bs import QUANTITIES, generate_bs
        from card.s1grd.safe import S3SafeSource, SafeError, SafeSource
        from cbmflow import store

        def fail(message: str) -> typer.Exit:
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            return typer.Exit(1)

        if quantity not in QUANTITIES:
            raise fail(f"--quantity must be one of {', '.join(QUANTITIES)}")
        try:
            grids = output_grids(tile, crs, bounds, resolution)
            provider = make_dem(dem, dem_geoid, dem_bucket, dem_cache)
            if orbit is not None and not orbit.is_file():
                raise FileNotFoundError(f"orbit file {orbit} not found")
            on_s3 = store.is_s3(source)
            product: str | SafeSource = S3SafeSource(source, store.s3_client()) if on_s3 else source
            for name, grid in grids:
                with store.gdal_env(store.gdal_path(source)) if on_s3 else local_gdal_env():
                    result = generate_bs(
                        product,
                        grid,
                        provider,
                        str(out),
                        quantity=quantity,
                        denoise=not no_denoise,
                        name=name,
                        polarisations=tuple(p.upper() for p in polarisation) or None,
                        software=f"cbmflow {__version__}",
                        orbit_file=orbit,
                        block_px=block_px(grid.resolution.x),
                        workers=workers,
                    )
                for pol, path in result.backscatter.items():
                    typer.echo(f"{pol}\t{path}")
                typer.echo(f"MASK\t{result.mask}")
                typer.echo(f"LIA\t{result.local_incidence}")
                rate = result.pixels / result.seconds if result.seconds > 0 else float("inf")
                typer.echo(f"{result.pixels} pixels in {result.seconds:.1f} s ({rate:,.0f} pixels/s)", err=True)
        except (SafeError, FileNotFoundError, ValueError, ClientError, BotoCoreError, store.StoreError) as exc:
            raise fail(str(exc)) from exc
