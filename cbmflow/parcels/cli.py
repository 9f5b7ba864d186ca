"""``cbmflow parcels`` and ``cbmflow aoi``: import and inspect parcels and areas of interest."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import typer
from psycopg2 import sql

from cbmflow import db
from cbmflow.errors import CbmflowError, InvalidInputError

# cbmflow.parcels.ingest (geopandas, the `parcels` extra) is imported inside the commands, so that
# registering these commands works on an install without that extra.

parcels_app = typer.Typer(help="Import and list parcels.", no_args_is_help=True)
aoi_app = typer.Typer(help="Areas of interest.", no_args_is_help=True)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


@parcels_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="GeoPackage, Shapefile, GeoJSON or GeoParquet file."),
    dataset: str = typer.Option(..., "--dataset", help="AOI (member state) name; the dataset is (AOI, year)."),
    year: int = typer.Option(..., "--year", help="Claim year."),
    id_column: str | None = typer.Option(None, "--id-column", help="Parcel id column (default: parcel_id, pid or id)."),
    crop_code_column: str | None = typer.Option(
        None, "--crop-code-column", help="Crop code column (default: crop_code)."
    ),
    crop_name_column: str | None = typer.Option(
        None, "--crop-name-column", help="Crop name column (default: crop_name)."
    ),
    layer: str | None = typer.Option(None, "--layer", help="Layer of a multi-layer file (GeoPackage)."),
    srid: int | None = typer.Option(None, "--srid", help="EPSG code of a NEW dataset (default: the file's)."),
    show: int = typer.Option(10, "--show", help="How many rejections to print."),
) -> None:
    """Upsert parcels by parcel id; invalid features are rejected with a reason, the rest imported.

    Exit code: 0 if any parcel was accepted (even with rejections), 1 if none was, 2 on an error.
    """
    from rich.console import Console
    from rich.table import Table

    from cbmflow.parcels.ingest import aoi_name, import_parcels

    try:
        conn = db.connect()
        try:
            with conn, conn.cursor() as cur:
                report = import_parcels(
                    cur,
                    file,
                    dataset,
                    year,
                    id_column=id_column,
                    crop_code_column=crop_code_column,
                    crop_name_column=crop_name_column,
                    layer=layer,
                    srid=srid,
                )
        finally:
            conn.close()
    except (CbmflowError, psycopg2.Error) as exc:
        raise _fail(exc) from exc
    console = Console()
    summary = Table(title=f"{file.name} → {aoi_name(dataset)}/{year} (EPSG:{report.srid})")
    for col in ("imported", "updated", "unchanged", "rejected", "parcels_version"):
        summary.add_column(col, justify="right")
    summary.add_row(
        str(report.imported),
        str(report.updated),
        str(report.unchanged),
        str(len(report.rejected)),
        str(report.parcels_version),
    )
    console.print(summary)
    if report.rejected:
        rejected = Table(title=f"first {min(show, len(report.rejected))} of {len(report.rejected)} rejections")
        for col in ("feature", "parcel id", "reason"):
            rejected.add_column(col)
        for index, pid_text, reason in report.rejected[:show]:
            rejected.add_row(str(index), pid_text or "-", reason)
        console.print(rejected)
    if report.accepted == 0:
        raise typer.Exit(1)


@parcels_app.command("list")
def list_cmd(
    dataset: str | None = typer.Option(None, "--dataset", help="Show parcels of this AOI (with --year)."),
    year: int | None = typer.Option(None, "--year"),
    limit: int = typer.Option(20, "--limit", help="Parcels shown with --dataset/--year."),
) -> None:
    """Datasets with their parcel counts, or the first parcels of one dataset."""
    from rich.console import Console
    from rich.table import Table

    from cbmflow.parcels.ingest import aoi_name

    console = Console()
    try:
        conn = db.connect()
        try:
            with conn, conn.cursor() as cur:
                if dataset is None:
                    table = Table(title="datasets")
                    for col in ("aoi", "year", "srid", "parcels", "parcels_version"):
                        table.add_column(col, justify="right" if col != "aoi" else "left")
                    for ds in db.list_datasets(cur):
                        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(ds.parcels))
                        count_row = cur.fetchone()
                        count = int(count_row[0]) if count_row else 0
                        table.add_row(ds.aoi, str(ds.year), str(ds.srid), str(count), str(ds.parcels_version))
                    console.print(table)
                    return
                if year is None:
                    raise InvalidInputError("--dataset needs --year")
                one = db.get_dataset(cur, aoi_name(dataset), year)
                if one is None:
                    raise InvalidInputError(f"no dataset {aoi_name(dataset)}/{year}")
                cur.execute(
                    sql.SQL(
                        "SELECT pid, parcel_id, crop_code, crop_name, ST_Area(geom) / 10000.0"
                        " FROM {} ORDER BY pid LIMIT %s"
                    ).format(one.parcels),
                    (limit,),
                )
                table = Table(title=f"{one.aoi}/{one.year} parcels (EPSG:{one.srid})")
                for col in ("pid", "parcel id", "crop code", "crop name", "area ha"):
                    table.add_column(col)
                for pid, parcel_id, code, crop, area_ha in cur.fetchall():
                    table.add_row(str(pid), parcel_id, code or "", crop or "", f"{area_ha:.4f}")
                console.print(table)
        finally:
            conn.close()
    except (CbmflowError, psycopg2.Error) as exc:
        raise _fail(exc) from exc


@aoi_app.command("add")
def aoi_add_cmd(
    name: str = typer.Argument(..., help="AOI name (lowercase letters, digits, _)."),
    file: Path = typer.Argument(..., help="GeoJSON, GeoPackage, Shapefile or GeoParquet polygon(s)."),
    layer: str | None = typer.Option(None, "--layer"),
) -> None:
    """Create or replace an AOI (stored as a MultiPolygon in EPSG:4326)."""
    from cbmflow.parcels.ingest import add_aoi, aoi_name

    try:
        conn = db.connect()
        try:
            with conn, conn.cursor() as cur:
                west, south, east, north = add_aoi(cur, name, file, layer=layer)
        finally:
            conn.close()
    except (CbmflowError, psycopg2.Error) as exc:
        raise _fail(exc) from exc
    typer.echo(f"aoi {aoi_name(name)}: {west:.5f}, {south:.5f} .. {east:.5f}, {north:.5f} (lon/lat)")


@aoi_app.command("list")
def aoi_list_cmd() -> None:
    """AOIs with their extent, area and datasets."""
    from rich.console import Console
    from rich.table import Table

    try:
        conn = db.connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT a.name, ST_XMin(a.geom), ST_YMin(a.geom), ST_XMax(a.geom), ST_YMax(a.geom),"
                    " ST_Area(a.geom::geography) / 1e6,"
                    " COALESCE(string_agg(d.year::text, ',' ORDER BY d.year), '')"
                    " FROM aois a LEFT JOIN datasets d ON d.aoi = a.name GROUP BY a.name, a.geom ORDER BY a.name"
                )
                rows = cur.fetchall()
        finally:
            conn.close()
    except (CbmflowError, psycopg2.Error) as exc:
        raise _fail(exc) from exc
    table = Table(title="areas of interest")
    for col in ("name", "west", "south", "east", "north", "area km²", "years"):
        table.add_column(col)
    for name, west, south, east, north, area_km2, years in rows:
        table.add_row(name, f"{west:.4f}", f"{south:.4f}", f"{east:.4f}", f"{north:.4f}", f"{area_km2:.1f}", years)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(parcels_app, name="parcels", help="Import and list parcels.")
    app.add_typer(aoi_app, name="aoi", help="Areas of interest.")
