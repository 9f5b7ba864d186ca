"""``cbmflow demo``: the whole chain on generated data, verified against the generator's truth.

Every step uses the same code paths as production: the local stack, migrations, the parcel
importer, the watcher on a STAC catalogue, the provisioner's local driver booting workers from
rendered cloud-init user-data, the workers, and the API.
"""

from __future__ import annotations

import math
import os
import secrets
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cbmflow import db
from cbmflow.logging import configure as configure_logging
from cbmflow.settings import BusSettings, DbSettings, ProvisionSettings, StackSettings, WatchSettings, state_dir

AOI = "ms"
YEAR = 2024
SEED = 42
S1_SCENES = 4
"""Sentinel-1 CARD backscatter products in the demo world (cheap: a fraction of a second to write
and to extract), and coherence products below; both verified with the S2 rows."""
C6_SCENES = 2
GRD_SCENES = 2
"""Sentinel-1 GRD products (CARD inputs): the workers' GenerateCard jobs turn each into backscatter
COGs on the world's MGRS tiles, registered as ``bs`` scenes and extracted like the others; their rows
are verified against ``truth_grd.csv``."""
COLLECTIONS = ["sentinel-2-l2a", "sentinel-1-card-bs", "sentinel-1-card-c6", "sentinel-1-grd"]


def _ndvi_table(dsn: str, console: Console) -> None:
    from psycopg2 import sql

    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, AOI, YEAR)
        assert ds is not None
        cur.execute(
            sql.SQL(
                "SELECT p.parcel_id, p.crop_name FROM {parcels} p JOIN {sigs} g ON g.pid = p.pid"
                " GROUP BY p.pid, p.parcel_id, p.crop_name ORDER BY count(*) DESC, p.pid LIMIT 1"
            ).format(parcels=ds.parcels, sigs=ds.sigs)
        )
        row = cur.fetchone()
        if row is None:
            console.print("[red]no signatures to show[/red]")
            return
        parcel_id, crop = row
        cur.execute(
            sql.SQL(
                "SELECT s.acquired_at::date, max(g.mean) FILTER (WHERE g.band = 'B04'),"
                " max(g.mean) FILTER (WHERE g.band = 'B08'), max(g.count) FILTER (WHERE g.band = 'B08'),"
                " (SELECT sum(h.count) FROM {hists} h WHERE h.pid = p.pid AND h.scene_id = s.id"
                "   AND h.class IN (3, 8, 9, 10))"
                " FROM {sigs} g JOIN {parcels} p ON p.pid = g.pid JOIN scenes s ON s.id = g.scene_id"
                " WHERE p.parcel_id = %s AND s.card = 's2' GROUP BY s.id, s.acquired_at, p.pid ORDER BY s.acquired_at"
            ).format(sigs=ds.sigs, parcels=ds.parcels, hists=ds.hists),
            (parcel_id,),
        )
        table = Table(title=f"NDVI of parcel {parcel_id} ({crop})")
        for col in ("date", "B04 mean", "B08 mean", "NDVI", "pixels", "cloud/shadow px (20 m)"):
            table.add_column(col, justify="right")
        for day, b4, b8, n, cloudy in cur.fetchall():
            ndvi = (b8 - b4) / (b8 + b4) if b4 is not None and b8 is not None and (b8 + b4) else float("nan")
            table.add_row(str(day), f"{b4:.1f}", f"{b8:.1f}", f"{ndvi:.3f}", str(n), str(cloudy or 0))
        console.print(table)
        cur.execute(
            sql.SQL(
                "SELECT s.acquired_at::date, s.card, max(g.mean) FILTER (WHERE g.band IN ('VVb', 'VVc')),"
                " max(g.mean) FILTER (WHERE g.band IN ('VHb', 'VHc')),"
                " max(g.count) FILTER (WHERE g.band IN ('VVb', 'VVc')),"
                " CASE WHEN s.card_input_id IS NULL THEN 'catalogue'"
                "      ELSE 'GRD → CARD-BS ' || split_part(s.acq_key, '_', 3) END"
                " FROM {sigs} g JOIN {parcels} p ON p.pid = g.pid JOIN scenes s ON s.id = g.scene_id"
                " WHERE p.parcel_id = %s AND s.card IN ('bs', 'c6') GROUP BY s.id ORDER BY s.acquired_at, s.card"
            ).format(sigs=ds.sigs, parcels=ds.parcels),
            (parcel_id,),
        )
        s1 = Table(
            title=f"Sentinel-1 CARD of parcel {parcel_id}: backscatter (bs, dB) and 6-day coherence (c6);"
            " 'GRD → CARD-BS': generated here from a GRD by a worker's GenerateCard job, on that S2 tile"
        )
        for col in ("date", "card", "VV", "VH", "pixels", "from"):
            s1.add_column(col, justify="right")
        for day, card, vv, vh, n, origin in cur.fetchall():
            if vv is None or vh is None:
                continue
            if card == "bs":
                s1.add_row(str(day), card, f"{10 * math.log10(vv):.2f}", f"{10 * math.log10(vh):.2f}", str(n), origin)
            else:
                s1.add_row(str(day), card, f"{vv:.3f}", f"{vh:.3f}", str(n), origin)
        if s1.row_count:
            console.print(s1)


def _progress(dsn: str) -> tuple[int, int]:
    """(jobs, finished): scenes plus GRD CARD inputs, and those done or failed for good."""
    with db.transaction(dsn) as cur:
        cur.execute(
            "SELECT (SELECT count(*) FROM scenes) + (SELECT count(*) FROM card_inputs WHERE kind = 'grd'),"
            " (SELECT count(*) FROM scenes WHERE status IN ('extracted', 'no_parcels', 'failed'))"
            " + (SELECT count(*) FROM card_inputs WHERE kind = 'grd' AND status IN ('done', 'failed'))"
        )
        row = cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _quiet_logs() -> None:
    """The story is the demo's output, so its own process logs only warnings and errors.

    Those still show, as console lines above the progress bar when a terminal watches (the logs
    write to the current stderr, which rich's live display redirects). ``CBMFLOW_LOG_LEVEL`` set
    by the user wins; the workers are separate processes and keep INFO in their log files.
    """
    if "CBMFLOW_LOG_LEVEL" not in os.environ:
        configure_logging(level="WARNING", force=True)


def run_demo(serve: bool, parcels: int, scenes: int, max_workers: int, port: int) -> int:
    """The chain, then, on every way out (the end with --no-serve, an error, Ctrl-C while it runs
    or while it serves), the workers it started are drained and stopped: left running they would
    outlive the stack (`cbmflow stack down`) and retry it. The stack itself stays up."""
    from provisioner.drivers.local import LocalDriver, started_here

    try:
        return _run_chain(serve, parcels, scenes, max_workers, port)
    finally:
        if started_here():
            LocalDriver(state_dir() / "workers", userdata="").stop(started_here(), StackSettings().worker_grace_s)


def _run_chain(serve: bool, parcels: int, scenes: int, max_workers: int, port: int) -> int:
    from card.testworld import TILE_ID, generate
    from catalog_watcher.service import watch_once
    from cbmflow.dev import stack
    from cbmflow.dev.verify import verify_card_truth, verify_truth
    from cbmflow.outbox import flush_outbox
    from cbmflow.parcels.ingest import add_aoi, import_parcels
    from provisioner.service import scale_once

    console = Console()
    _quiet_logs()
    started = time.monotonic()
    console.rule("[bold]cbmflow demo")
    info = stack.up(state_dir(), StackSettings())
    console.print(f"stack: PostgreSQL {info['dsn'].split('@')[-1]}, RabbitMQ console {info['console_url']}")
    dsn = DbSettings().resolved_dsn()
    applied = db.migrate(dsn)
    console.print(f"schema: {len(applied)} migration(s) applied")

    world = state_dir() / "demo"
    t0 = time.monotonic()
    summary = generate(
        world,
        parcels=parcels,
        scenes=scenes,
        seed=SEED,
        aoi_name=AOI,
        year=YEAR,
        s1_scenes=S1_SCENES,
        c6_scenes=C6_SCENES,
        grd_scenes=GRD_SCENES,
    )
    console.print(
        f"test world: {summary.n_parcels} parcels ({summary.n_invalid} invalid on purpose), "
        f"{len(summary.products)} S2 L2A products, {len(summary.s1_products)} S1 CARD products (bs, c6),"
        f" {len(summary.grd_products)} S1 GRD products (CARD inputs) in {time.monotonic() - t0:.1f} s → {world}"
    )
    with db.transaction(dsn) as cur:
        add_aoi(cur, AOI, world / "aoi.geojson")
        report = import_parcels(cur, world / "parcels.gpkg", AOI, YEAR)
    console.print(
        f"parcels: {report.imported} imported, {report.updated} updated, {len(report.rejected)} rejected"
        + (f" (e.g. {report.rejected[0][1]}: {report.rejected[0][2]})" if report.rejected else "")
    )

    watch = WatchSettings(catalog_url=str(world / "stac" / "catalog.json"), lookback_days=0, collections=COLLECTIONS)
    wr = watch_once(dsn=dsn, settings=watch)
    grd_inputs = wr.card_inputs.get("new", 0) + wr.card_inputs.get("changed", 0) + wr.card_inputs.get("superseded", 0)
    console.print(
        f"watch: {wr.seen} products over the AOI, {wr.new} new scenes, {grd_inputs} GRD CARD inputs,"
        f" {wr.published} jobs published (extraction, and GenerateCard on its own queue)"
    )

    total, _ = _progress(dsn)
    prov = ProvisionSettings(min_workers=0, max_workers=max_workers, per_worker=max(1, scenes // max_workers))
    plan = scale_once(prov, dry_run=False)
    console.print(f"provision: {plan}")

    deadline = time.monotonic() + 900
    bus = BusSettings()
    with Progress(
        TextColumn("CARD generation and extraction"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("jobs", total=total)
        while True:
            total, finished = _progress(dsn)  # grows as CARD jobs register their scenes
            progress.update(task, total=total, completed=finished)
            if finished >= total:
                break
            # A CARD job's extraction jobs are published by its worker; what a worker without that
            # right leaves pending is published here, as the watcher's next cycle would.
            flush_outbox(dsn, bus)
            if time.monotonic() > deadline:
                console.print("[red]timed out waiting for the workers[/red]")
                return 1
            time.sleep(0.5)
    with db.transaction(dsn) as cur:
        cur.execute("SELECT status, count(*) FROM scenes GROUP BY status ORDER BY status")
        by_status = dict(cur.fetchall())
        cur.execute(
            "SELECT ci.status, count(DISTINCT ci.id), count(s.id) FROM card_inputs ci"
            " LEFT JOIN scenes s ON s.card_input_id = ci.id WHERE ci.kind = 'grd' GROUP BY ci.status"
        )
        cards = {status: (int(n), int(made)) for status, n, made in cur.fetchall()}
    console.print(f"scenes by status: {by_status}")
    console.print(
        "GRD CARD inputs: "
        + ", ".join(f"{n} {status} ({made} bs scenes on S2 tiles)" for status, (n, made) in sorted(cards.items()))
    )
    scale_once(ProvisionSettings(min_workers=0, max_workers=max_workers, per_worker=1), dry_run=False)

    _ndvi_table(dsn, console)
    tally = verify_truth(dsn, world / "truth.csv", AOI, YEAR)
    colour = "green" if tally.ok else "red"
    console.print(
        f"[{colour}]verification against truth.csv: {tally.expected} (parcel, product, band) rows expected, "
        f"{tally.found} found, counts equal {tally.count_equal}, means equal {tally.mean_equal}, "
        f"missing {tally.missing}, extra {tally.extra}[/{colour}]"
    )
    for line in tally.mismatches:
        console.print(f"  [red]{line}[/red]")
    card_ok = True
    if summary.truth_grd_path is not None:
        card = verify_card_truth(dsn, summary.truth_grd_path, AOI, YEAR, tile=TILE_ID)
        card_ok = card.ok()
        colour = "green" if card_ok else "red"
        errors = ", ".join(
            f"{band} median {100 * card.median_rel_error[band]:.1f} % (bias {100 * card.median_bias[band]:+.1f} %),"
            f" max {100 * card.max_rel_error[band]:.1f} %"
            for band in sorted(card.median_rel_error)
        )
        console.print(
            f"[{colour}]CARD-BS from GRD against truth_grd.csv: {card.expected} (parcel, GRD, band) rows, counts"
            f" equal on {TILE_ID} {card.count_equal}, missing {card.missing}; γ0 means {errors}"
            f"; {card.other_tiles} more rows on overlapping tiles (another lattice): "
            + ", ".join(
                f"{band} median {100 * card.other_median_rel_error[band]:.1f} %,"
                f" max {100 * card.other_max_rel_error[band]:.1f} %"
                for band in sorted(card.other_median_rel_error)
            )
            + f"[/{colour}]"
        )
        for line in card.mismatches:
            console.print(f"  [red]{line}[/red]")
    console.print(f"demo chain finished in {time.monotonic() - started:.1f} s")
    if not tally.ok or not card_ok or by_status.get("failed") or "failed" in cards:
        return 1

    password = _demo_user(dsn)
    url = f"http://127.0.0.1:{port}"
    some_pid = _some_parcel(dsn)
    console.print(
        "API credentials: user [bold]demo[/bold], password "
        f"[bold]{password}[/bold] (stored argon2-hashed; also in {state_dir() / 'demo' / 'api-user.txt'})"
    )
    console.print(
        f"try: curl -u demo:{password} '{url}/query/parcelTimeSeries?aoi={AOI}&year={YEAR}&pid={some_pid}&tstype=s2'"
    )
    console.print(
        f"explorer: {url}/?dataset={AOI}&year={YEAR}&pid={some_pid} (log in as demo / {password};"
        " served while this demo or `cbmflow api` runs)"
    )
    if serve:
        from api.server import serve as serve_api

        console.print(f"serving the API at {url} (Ctrl-C to stop; the stack stays up until `cbmflow stack down`)")
        serve_api(host="127.0.0.1", port=port, workers=1)
    else:
        console.print("stack left running; stop it with `cbmflow stack down`")
    return 0


def _demo_user(dsn: str) -> str:
    from api.users import upsert_user

    path = state_dir() / "demo" / "api-user.txt"
    password = path.read_text().strip() if path.exists() else secrets.token_urlsafe(12)
    with db.transaction(dsn) as cur:
        upsert_user(cur, "demo", password, datasets=[AOI])
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password


def _some_parcel(dsn: str) -> str:
    from psycopg2 import sql

    with db.transaction(dsn) as cur:
        ds = db.get_dataset(cur, AOI, YEAR)
        assert ds is not None
        cur.execute(sql.SQL("SELECT parcel_id FROM {} ORDER BY pid LIMIT 1").format(ds.parcels))
        row = cur.fetchone()
    return str(row[0]) if row else ""
