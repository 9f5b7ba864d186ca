"""``make bench-api``: parcelTimeSeries latency and throughput on a national-scale signatures table.

A throwaway PostgreSQL cluster (kept under ``$CBMFLOW_STATE_DIR/bench-api`` so a re-run reuses
the loaded data) receives ``--rows`` synthetic signature rows written *scene by scene*, the order
in which workers write them, into the tables ``ensure_dataset`` creates. Indexes are dropped for
the load and rebuilt from their own definitions afterwards, so the layout measured is exactly the
production one. Then: the time-series query in the database (server execution and client round
trip, with and without index-only scans), the route over HTTP with keep-alive, and requests/s from
``wrk`` on 127.0.0.1 with 1 and 2 API workers. The table is printed and written to
docs/performance.md between markers. This is a benchmark, not a test: nothing asserts the targets.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from psycopg2 import sql

from api import prepared, queries
from api.auth import hash_password
from cbmflow import db
from cbmflow.dev.api_process import api_server, free_port
from cbmflow.settings import StackSettings, state_dir

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- bench-api:begin -->", "<!-- bench-api:end -->"
AOI, YEAR = "bench", 2024
BANDS = ("B02", "B03", "B04", "B05", "B08", "B11")
USER, PASSWORD = "bench", "bench-password-1"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _progress(msg: str) -> None:
    print(f"[bench-api {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loaded(cur: db.Cursor, rows: int, parcels: int, scenes: int) -> bool:
    cur.execute("CREATE TABLE IF NOT EXISTS bench_api_meta (rows bigint, parcels int, scenes int)")
    cur.execute("SELECT rows, parcels, scenes FROM bench_api_meta")
    return bool(cur.fetchone() == (rows, parcels, scenes))


def _rebuild_statements(cur: db.Cursor, table: str) -> list[str]:
    """The DDL that recreates every index and key of ``table`` as it is defined now."""
    cur.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = %s::regclass AND c.contype IN ('p', 'u')",
        (table,),
    )
    constraints = cur.fetchall()
    out = [f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}" for name, definition in constraints]
    cur.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " WHERE i.indrelid = %s::regclass AND NOT EXISTS"
        " (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
        (table,),
    )
    indexes = cur.fetchall()
    out += [definition for _, definition in indexes]
    for name, _ in constraints:
        cur.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
    for name, _ in indexes:
        cur.execute(f"DROP INDEX {name}")
    return out


def load(dsn: str, rows: int, parcels: int) -> tuple[int, int]:
    """Synthetic dataset of about ``rows`` signature rows; returns (parcels, scenes)."""
    scenes = max(1, round(rows / (parcels * len(BANDS))))
    conn = db.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if _loaded(cur, rows, parcels, scenes):
                _progress(f"reusing loaded data: {rows:,} rows ({parcels:,} parcels x {scenes} scenes)")
                return parcels, scenes
            _progress(f"loading {parcels:,} parcels x {scenes} scenes x {len(BANDS)} bands")
            cur.execute("SET maintenance_work_mem = '1GB'")
            cur.execute("DROP SCHEMA IF EXISTS bench CASCADE")
            cur.execute("DELETE FROM datasets WHERE aoi = %s", (AOI,))
            cur.execute("DELETE FROM scenes")
            cur.execute("DELETE FROM users WHERE name = %s", (USER,))
            cur.execute(
                "INSERT INTO aois (name, geom) VALUES (%s, ST_Multi(ST_MakeEnvelope(5, 45, 15, 55, 4326)))"
                " ON CONFLICT (name) DO NOTHING",
                (AOI,),
            )
            ds = db.ensure_dataset(cur, AOI, YEAR, 3035)
            side = int(parcels**0.5) + 1
            cur.execute(
                sql.SQL(
                    "INSERT INTO {t} (pid, parcel_id, crop_code, crop_name, geom)"
                    " SELECT i, 'BP-' || i, (i %% 7)::text, 'crop' || (i %% 7),"
                    " ST_Multi(ST_MakeEnvelope(4300000 + (i %% %(side)s) * 120, 3200000 + (i / %(side)s) * 120,"
                    " 4300000 + (i %% %(side)s) * 120 + 100, 3200000 + (i / %(side)s) * 120 + 100, 3035))"
                    " FROM generate_series(1, %(n)s) i"
                ).format(t=ds.parcels),
                {"side": side, "n": parcels},
            )
            cur.execute(
                "INSERT INTO scenes (product_id, product_name, mission, sensor, card, acquired_at, footprint,"
                " location, status)"
                " SELECT 'bench-' || i, 'S2A_MSIL2A_BENCH_' || i, 'sentinel-2', 'S2A', 's2',"
                " timestamptz '2024-03-01 10:30:00+00' + i * interval '4 days',"
                " ST_Multi(ST_MakeEnvelope(5, 45, 15, 55, 4326)), '/nowhere', 'extracted'"
                " FROM generate_series(1, %s) i",
                (scenes,),
            )
            cur.execute("SELECT id FROM scenes WHERE product_id LIKE 'bench-%%' ORDER BY acquired_at")
            scene_ids = [int(r[0]) for r in cur.fetchall()]
            # sql/011: one row per (parcel, scene) in <sigs>_obs, the band order per scene in <sigs>_bands
            obs, band_table = ds.ident(f"{ds.sigs_table}_obs"), ds.ident(f"{ds.sigs_table}_bands")
            rebuild = _rebuild_statements(cur, obs.as_string(cur))
            t0 = time.monotonic()
            for k, scene_id in enumerate(scene_ids, start=1):
                # scene-major, as the worker writes: one scene's rows for every parcel, then the next
                cur.execute(
                    sql.SQL("INSERT INTO {t} (scene_id, bands) VALUES (%(s)s, %(bands)s)").format(t=band_table),
                    {"s": scene_id, "bands": list(BANDS)},
                )
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {t} (scene_id, pid, stats, scl)"
                        " SELECT %(s)s, p, (SELECT array_agg(u.x ORDER BY b.i, u.j)"
                        " FROM unnest(%(bands)s::text[]) WITH ORDINALITY b(name, i),"
                        " LATERAL (SELECT 500 + ((p * 7919 + %(s)s * 104729 + ascii(right(b.name, 1))) %% 3000)::float8"
                        " AS m) v, LATERAL unnest(ARRAY[20 + p %% 50, v.m, v.m * 0.1, v.m * 0.7, v.m * 1.3, v.m * 0.9,"
                        " v.m, v.m * 1.1]::real[]) WITH ORDINALITY u(x, j)),"
                        " ARRAY[4, 40, CASE WHEN (p + %(s)s) %% 5 = 0 THEN 9 ELSE 5 END, 5]"
                        " FROM generate_series(1, %(n)s) p"
                    ).format(t=obs),
                    {"s": scene_id, "n": parcels, "bands": list(BANDS)},
                )
                done = k * parcels * len(BANDS)
                rate = done / max(time.monotonic() - t0, 1e-9)
                if k % max(1, len(scene_ids) // 20) == 0 or k == len(scene_ids):
                    _progress(f"scene {k}/{len(scene_ids)}: {done:,} signature rows, {rate:,.0f} rows/s")
            _progress("building keys and indexes from their definitions")
            for statement in rebuild:
                cur.execute(statement)
            _progress("vacuum analyze (visibility map for index-only scans)")
            cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(obs))
            cur.execute(sql.SQL("VACUUM (ANALYZE) {}").format(band_table))
            cur.execute("ANALYZE scenes")
            cur.execute(
                "INSERT INTO users (name, password_hash) VALUES (%s, %s)",
                (USER, hash_password(PASSWORD)),
            )
            cur.execute("INSERT INTO user_grants (user_name, aoi) VALUES (%s, %s)", (USER, AOI))
            cur.execute("DELETE FROM bench_api_meta")
            cur.execute("INSERT INTO bench_api_meta VALUES (%s, %s, %s)", (rows, parcels, scenes))
            _progress(f"loaded in {time.monotonic() - t0:,.0f} s")
            return parcels, scenes
    finally:
        conn.close()


def measure_db(dsn: str, parcels: int, samples: int, seed: int) -> dict[str, Any]:
    """p50/p99 of the route's own statement (user row, grants, parcel key and series JSON in one)
    for random parcels: prepared, as the route runs it, and as plain text, planned every time.

    Server execution is EXPLAIN ANALYZE's (planning excluded); the round trip is what psycopg2
    sees. Index-only scans off shows what the covering primary key buys.
    """
    conn = db.connect(dsn)
    conn.autocommit = True
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    try:
        with conn.cursor() as cur:
            ds = db.get_dataset(cur, AOI, YEAR)
            assert ds is not None
            cur.execute(
                sql.SQL("SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))"),
                (ds.ident(f"{ds.sigs_table}_obs").as_string(cur),),
            )
            out["sigs_size"] = cur.fetchone()[0]
            cur.execute("SELECT rows FROM bench_api_meta")
            out["rows"] = int(cur.fetchone()[0])
            cur.execute("SET default_transaction_read_only = on")
            text = queries.series_for_user_sql(ds, bands=None, scl=True, ref=False).as_string(cur)
            stmt = prepared._compile(text)
            cur.execute(stmt.prepare)
            params = {"user": USER, "aoi": AOI, "pid": "", "card": "s2", "bands": []}
            body = ""
            for label, query, index_only in (
                ("prepared", stmt.execute, True),
                ("plain", text, True),
                ("heap", stmt.execute, False),
            ):
                cur.execute(f"SET enable_indexonlyscan = {'on' if index_only else 'off'}")
                cur.execute("DEALLOCATE ALL")  # a cached plan would ignore the setting
                cur.execute(stmt.prepare)
                pids = [f"BP-{rng.randint(1, parcels)}" for _ in range(samples)]
                client_ms: list[float] = []
                for i, pid in enumerate([*pids[:100], *pids]):  # the first 100: warm-up, generic plan
                    t = time.perf_counter()
                    cur.execute(query, {**params, "pid": pid})
                    body = str(cur.fetchone()[5])
                    if i >= 100:
                        client_ms.append((time.perf_counter() - t) * 1000)
                out["series_rows"] = len(json.loads(body)["band"])
                server_ms: list[float] = []
                for pid in pids[: max(50, samples // 4)]:
                    cur.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + query, {**params, "pid": pid})
                    server_ms.append(float(cur.fetchone()[0][0]["Execution Time"]))
                out[label] = {
                    "client_p50": _pct(client_ms, 50),
                    "client_p99": _pct(client_ms, 99),
                    "server_p50": _pct(server_ms, 50),
                    "server_p99": _pct(server_ms, 99),
                }
    finally:
        conn.close()
    return out


def measure_http(base: str, parcels: int, samples: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    ms: list[float] = []
    with requests.Session() as s:
        s.auth = (USER, PASSWORD)
        for i in range(samples + 50):
            url = f"{base}/query/parcelTimeSeries?aoi={AOI}&year={YEAR}&pid=BP-{rng.randint(1, parcels)}&tstype=s2"
            t = time.perf_counter()
            r = s.get(url, timeout=30)
            elapsed = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            if i >= 50:  # the first requests fill the pool and the auth cache
                ms.append(elapsed)
    return {"p50": _pct(ms, 50), "p99": _pct(ms, 99), "mean": statistics.fmean(ms)}


WRK_LUA = """
math.randomseed(%(seed)d)
wrk.headers["Authorization"] = "Basic %(auth)s"
request = function()
  local pid = math.random(1, %(n)d)
  return wrk.format("GET", "/query/parcelTimeSeries?aoi=%(aoi)s&year=%(year)d&tstype=s2&pid=BP-" .. pid)
end
"""


MARKER = "CBMFLOW_BENCH_API_SERVER"
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _cpu_s(match: Callable[[str, bytes], bool]) -> float:
    """CPU seconds (user + system) of the live processes that ``match`` (pid, cmdline) selects."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not match(pid, f.read()):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) * _TICK_S
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return total


def _is_api(pid: str, _cmdline: bytes) -> bool:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f"{MARKER}=1".encode() in f.read().split(b"\0")


def _is_bench_backend(_pid: str, cmdline: bytes) -> bool:
    return cmdline.startswith(b"postgres: ") and b" cbmflow_bench " in cmdline


def _busy_s() -> float:
    """CPU seconds all processes on the host have used (the non-idle columns of /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) * _TICK_S


def measure_wrk(base: str, parcels: int, duration_s: int, connections: int, seed: int) -> dict[str, float]:
    """Requests/s and latency under wrk, and where the CPU went: per request, the API processes,
    the PostgreSQL backends and wrk itself, plus whatever else ran on the host meanwhile."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk (make bench-api installs it)")
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % {"seed": seed, "auth": auth, "aoi": AOI, "year": YEAR, "n": parcels})
        script = f.name
    try:
        # Unmeasured warm-up: every worker process verifies the password once, opens its pools
        # and prepares its statements (a keep-alive client before this reached only one worker).
        subprocess.run([wrk, "-t2", f"-c{connections}", "-d2s", "-s", script, base], capture_output=True, check=True)
        api0, pg0, busy0 = _cpu_s(_is_api), _cpu_s(_is_bench_backend), _busy_s()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = subprocess.run(
            [wrk, "-t2", f"-c{connections}", f"-d{duration_s}s", "--latency", "-s", script, base],
            capture_output=True,
            text=True,
            check=True,
        )
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        api1, pg1, busy1 = _cpu_s(_is_api), _cpu_s(_is_bench_backend), _busy_s()
    finally:
        os.unlink(script)
    text = res.stdout
    done = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    wrk_s = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    cpu = {
        "api_ms": 1000 * (api1 - api0) / done,
        "pg_ms": 1000 * (pg1 - pg0) / done,
        "wrk_ms": 1000 * wrk_s / done,
        "other_s": max(0.0, (busy1 - busy0) - (api1 - api0) - (pg1 - pg0) - wrk_s),
    }
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} error responses:\n{text}")

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", text, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    return {"rps": rps, "p50": lat("50"), "p99": lat("99"), **cpu}


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    d = res["db"]
    cores = os.cpu_count() or 1

    def db_row(name: str, key: str, which: str, target: str = "") -> str:
        return f"| {name} | {d[key][f'{which}_p50']:.3f} | {d[key][f'{which}_p99']:.3f} | | {target} |"

    lines = [
        f"{res['rows']:,} signature rows ({res['parcels']:,} parcels x {res['scenes']} scenes x {len(BANDS)} bands,"
        f" sigs table + indexes {d['sigs_size']}); one parcel's s2 series = {d['series_rows']} rows with SCL"
        f" histograms; {cores} CPU cores, PostgreSQL 15 shared_buffers 128MB; {args.samples} random"
        " parcels per figure. DB rows time the route's own statement (user row, grants, parcel key and series"
        " JSON in one).",
        "",
        "| measurement | p50 ms | p99 ms | req/s | target |",
        "|---|---:|---:|---:|---|",
        db_row("DB, server execution (EXPLAIN ANALYZE), prepared, covering key", "prepared", "server", "≤ 1 ms p50"),
        db_row("DB, client round trip (psycopg2), prepared, covering key", "prepared", "client"),
        db_row("DB, client round trip, plain text (parsed and planned every time)", "plain", "client", "(comparison)"),
        db_row("DB, server execution, index-only scans off (heap, scene-major)", "heap", "server", "(comparison)"),
        db_row("DB, client round trip, index-only scans off", "heap", "client", "(comparison)"),
    ]
    cpu_lines = []
    for workers, h in res["http"].items():
        lines.append(
            f"| HTTP, one keep-alive client, {workers} API worker(s) | {h['seq']['p50']:.3f} | {h['seq']['p99']:.3f}"
            f" | {1000 / h['seq']['mean']:.0f} | ≤ 5 ms p50 |"
        )
        w = h["wrk"]
        lines.append(
            f"| HTTP, wrk -t2 -c{args.connections} {args.duration}s, {workers} API worker(s) | {w['p50']:.2f} |"
            f" {w['p99']:.2f} | {w['rps']:.0f} | ≥ 1,000 req/s on 2 cores |"
        )
        total = w["api_ms"] + w["pg_ms"] + w["wrk_ms"]
        cpu_lines.append(
            f"| {workers} | {w['api_ms']:.3f} | {w['pg_ms']:.3f} | {w['wrk_ms']:.3f} | {total:.3f} |"
            f" {cores * 1000 / total:,.0f} | {w['other_s']:.1f} s of {cores * args.duration} s |"
        )
    lines += [
        "",
        "CPU per request under wrk (process CPU time / requests served), and the rate those costs allow when"
        " the API, PostgreSQL and wrk have every core to themselves:",
        "",
        "| API workers | API ms | PostgreSQL ms | wrk ms | total ms | cores / total (req/s) |"
        " other processes' CPU meanwhile |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *cpu_lines,
    ]
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + f"\n\n## API\n\n{block}\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cbmflow.dev.bench.api", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000_000, help="signature rows to load (default 50M)")
    ap.add_argument("--parcels", type=int, default=140_000, help="parcels; scenes = rows / (parcels x 6 bands)")
    ap.add_argument("--samples", type=int, default=2000, help="random parcels per latency figure")
    ap.add_argument("--duration", type=int, default=15, help="seconds of wrk load per worker count")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--workers", default="1,2", help="API worker counts to measure")
    ap.add_argument("--state", type=Path, default=None, help="cluster directory (default $CBMFLOW_STATE_DIR/bench-api)")
    ap.add_argument("--load-only", action="store_true", help="load the data and stop")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    from cbmflow.dev.stack import start_postgres, stop_postgres

    base_dir = args.state or (state_dir() / "bench-api")
    pg = start_postgres(base_dir, free_port(), StackSettings().run_as, "cbmflow_bench", "cbmflow")
    try:
        dsn = pg.dsn
        db.migrate(dsn)
        parcels, scenes = load(dsn, args.rows, args.parcels)
        if args.load_only:
            return
        res: dict[str, Any] = {"rows": args.rows, "parcels": parcels, "scenes": scenes}
        _progress("measuring the time-series query in the database")
        res["db"] = measure_db(dsn, parcels, args.samples, args.seed)
        res["rows"] = parcels * scenes * len(BANDS)
        res["http"] = {}
        for workers in [int(w) for w in args.workers.split(",") if w.strip()]:
            _progress(f"HTTP with {workers} API worker(s)")
            with api_server(dsn, workers, env={MARKER: "1"}) as base:
                seq = measure_http(base, parcels, min(args.samples, 2000), args.seed)
                w = measure_wrk(base, parcels, args.duration, args.connections, args.seed)
            res["http"][workers] = {"seq": seq, "wrk": w}
        table = render(res, args)
        print(table)
        if not args.no_doc:
            write_doc(table)
            _progress(f"figures written to {DOC.relative_to(REPO)}")
    finally:
        stop_postgres(base_dir)


if __name__ == "__main__":
    main()
