"""``cbmflow card bs``: a Sentinel-1 GRD → CARD-BS COGs on a map grid, without a database or a queue.

The physics lives in :mod:`card.s1grd`; this module only turns options into a grid, a DEM provider
and a call, and errors into one line. The grid is given as ``--crs/--bounds/--resolution``
(snapped outwards to whole pixels); Sentinel-2 MGRS tile names (``--tile``) are not resolved yet.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cbmflow import __version__

if TYPE_CHECKING:
    from card.geobox import GeoBox

QUANTITY_HELP = "gamma0-rtc (terrain-flattened), gamma0 (ellipsoid, JRC's Gamma0), sigma0 or beta0."


def build_grid(crs: str, bounds: tuple[float, float, float, float], resolution_m: float) -> GeoBox:
    """A north-up GeoBox covering ``bounds``, its corners snapped outwards to multiples of the resolution."""
    from affine import Affine

    from card.geobox import GeoBox

    xmin, ymin, xmax, ymax = bounds
    if not (xmax > xmin and ymax > ymin and resolution_m > 0):
        raise ValueError(f"bounds must be XMIN YMIN XMAX YMAX with XMAX > XMIN, YMAX > YMIN; got {bounds}")
    x0 = math.floor(xmin / resolution_m) * resolution_m
    y1 = math.ceil(ymax / resolution_m) * resolution_m
    nx = math.ceil((xmax - x0) / resolution_m)
    ny = math.ceil((y1 - ymin) / resolution_m)
    return GeoBox((ny, nx), Affine(resolution_m, 0.0, x0, 0.0, -resolution_m, y1), crs.upper())


def register(app: typer.Typer) -> None:
    card_app = typer.Typer(help="Generate CARD (analysis-ready) rasters from Copernicus inputs.", no_args_is_help=True)
    app.add_typer(card_app, name="card")

    @card_app.command("bs")
    def bs_cmd(
        source: Path = typer.Argument(..., help="Sentinel-1 GRD: the .SAFE directory or its .zip."),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        dem: str = typer.Option("flat", "--dem", help="'flat' (height 0 on the WGS84 ellipsoid) or a DEM raster."),
        dem_geoid: str | None = typer.Option(
            None, "--dem-geoid", help="Vertical datum of --dem heights: 'egm96' (else ellipsoidal)."
        ),
        tile: str | None = typer.Option(None, "--tile", help="Sentinel-2 MGRS tile (not implemented yet)."),
        crs: str | None = typer.Option(None, "--crs", help="Output CRS, e.g. EPSG:32633."),
        bounds: tuple[float, float, float, float] | None = typer.Option(
            None, "--bounds", help="XMIN YMIN XMAX YMAX in --crs units."
        ),
        resolution: float = typer.Option(10.0, "--resolution", help="Pixel size in --crs units (metres)."),
        quantity: str = typer.Option("gamma0-rtc", "--quantity", help=QUANTITY_HELP),
        no_denoise: bool = typer.Option(False, "--no-denoise", help="Keep the thermal noise (not recommended)."),
        polarisation: list[str] = typer.Option([], "--pol", help="Polarisations (default: all in the product)."),
    ) -> None:
        """Calibrated, noise-removed, geocoded (and terrain-flattened) backscatter: one COG per polarisation."""
        from card.s1grd.bs import QUANTITIES, generate_bs
        from card.s1grd.dem import Dem, FileDem, FlatDem
        from card.s1grd.safe import SafeError

        def fail(message: str) -> typer.Exit:
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            return typer.Exit(1)

        if tile is not None:
            raise fail("--tile is not implemented yet: give --crs, --bounds and --resolution")
        if crs is None or bounds is None:
            raise fail("give the output grid: --crs EPSG:N --bounds XMIN YMIN XMAX YMAX [--resolution M]")
        if quantity not in QUANTITIES:
            raise fail(f"--quantity must be one of {', '.join(QUANTITIES)}")
        try:
            grid = build_grid(crs, bounds, resolution)
            provider: Dem = FlatDem() if dem == "flat" else FileDem(Path(dem), dem_geoid)
            if dem != "flat" and not Path(dem).is_file():
                raise FileNotFoundError(f"DEM {dem} not found")
            result = generate_bs(
                str(source),
                grid,
                provider,
                str(out),
                quantity=quantity,
                denoise=not no_denoise,
                polarisations=tuple(p.upper() for p in polarisation) or None,
                software=f"cbmflow {__version__}",
            )
        except (SafeError, FileNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from exc
        for pol, path in result.backscatter.items():
            typer.echo(f"{pol}\t{path}")
        typer.echo(f"MASK\t{result.mask}")
        typer.echo(f"LIA\t{result.local_incidence}")
        rate = result.pixels / result.seconds if result.seconds > 0 else float("inf")
        typer.echo(f"{result.pixels} pixels in {result.seconds:.1f} s ({rate:,.0f} pixels/s)", err=True)
