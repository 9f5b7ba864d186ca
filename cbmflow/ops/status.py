"""``cbmflow status``: queue depths, scenes by status and workers, read from the real sources.

Each source is read on its own, so a broker or database that is down shows as an error line
while the other half of the screen still answers: status is what an operator runs when
something is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.settings import BusSettings, DbSettings, WorkerSettings


def collect() -> dict[str, Any]:
    """``queues``: every job queue (extraction, CARD generation) by name; ``queue``: the extraction
    queue alone with the dead-letter count, as before the CARD queue existed."""
    out: dict[str, Any] = {}
    bus = BusSettings()
    out["queues"] = {}
    for name in bus.job_queues:
        try:
            depth = busmod.queue_depth(bus, queue=name)
            out["queues"][name] = {
                "ready": depth.ready,
                "unacked": depth.unacked,
                "consumers": depth.consumers,
                "dead_lettered": depth.dead_lettered,
            }
        except Exception as exc:  # noqa: BLE001 - status must show what it can
            out["queues"][name] = {"error": str(exc)}
    out["queue"] = dict(out["queues"][bus.queue])
    dead = next((q["dead_lettered"] for q in out["queues"].values() if "dead_lettered" in q), None)
    for q in out["queues"].values():
        q.pop("dead_lettered", None)  # one dead-letter queue for all: shown once
    if dead is not None:
        out["dead_lettered"] = dead
    # A worker silent for three heartbeats is probably dead; its lease expires on its own.
    stale_s = 3 * WorkerSettings().heartbeat_s
    try:
        with db.transaction(DbSettings().resolved_dsn()) as cur:
            cur.execute("SELECT status, count(*) FROM scenes GROUP BY status ORDER BY status")
            out["scenes"] = {s: int(n) for s, n in cur.fetchall()}
            cur.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            row = cur.fetchone()
            out["outbox_pending"] = int(row[0]) if row else 0
            cur.execute(
                "SELECT id, host, pid, state, current_scene, extract(epoch FROM now() - heartbeat_at)::int,"
                " metrics_port FROM workers"
                " WHERE state <> 'stopped' OR heartbeat_at > now() - interval '10 minutes' ORDER BY id"
            )
            out["workers"] = [
                {
                    "id": r[0],
                    "host": r[1],
                    "pid": r[2],
                    "state": r[3],
                    "current_scene": r[4],
                    "heartbeat_age_s": r[5],
                    "stale": r[3] != "stopped" and r[5] > stale_s,
                    "metrics": f"http://{r[1]}:{r[6]}/metrics" if r[6] else None,
                }
                for r in cur.fetchall()
            ]
            cur.execute(
                "SELECT id, product_id, reason FROM scenes WHERE status = 'failed' ORDER BY updated_at DESC LIMIT 10"
            )
            out["failed"] = [{"scene_id": r[0], "product_id": r[1], "reason": r[2]} for r in cur.fetchall()]
            out["rejected"] = _rejected(cur)
            out["card_inputs"] = _card_inputs(cur)
    except Exception as exc:  # noqa: BLE001 - status must show what it can
        out["database"] = {"error": str(exc).strip()}
        out.setdefault("scenes", {})
        out.setdefault("workers", [])
        out.setdefault("failed", [])
        out.setdefault("rejected", {"count": 0, "latest": []})
        out.setdefault("card_inputs", {})
    return out


def _card_inputs(cur: db.Cursor) -> dict[str, dict[str, int]]:
    """Sentinel-1 GRD/SLC products the watcher recorded as CARD inputs: {kind: {status: count}}.

    Shown so that inputs waiting for CARD generation are visible, not mistaken for lost scenes."""
    cur.execute("SELECT to_regclass('public.card_inputs')")
    row = cur.fetchone()
    if row is None or row[0] is None:
        return {}
    cur.execute("SELECT kind, status, count(*) FROM card_inputs GROUP BY kind, status ORDER BY kind, status")
    out: dict[str, dict[str, int]] = {}
    for kind, status, n in cur.fetchall():
        out.setdefault(str(kind), {})[str(status)] = int(n)
    return out


def _rejected(cur: db.Cursor) -> dict[str, Any]:
    """Catalogue items the watcher could not read: how many, and the latest few with their reason."""
    cur.execute("SELECT to_regclass('public.rejected_items')")
    row = cur.fetchone()
    if row is None or row[0] is None:  # a database not yet migrated to 006
        return {"count": 0, "latest": []}
    cur.execute("SELECT count(*) FROM rejected_items")
    count = cur.fetchone()
    cur.execute(
        "SELECT source, collection, item_id, reason, seen_count, last_seen FROM rejected_items"
        " ORDER BY last_seen DESC, item_id LIMIT 10"
    )
    latest = [
        {
            "source": r[0],
            "collection": r[1],
            "item_id": r[2],
            "reason": r[3],
            "seen_count": r[4],
            "last_seen": r[5].isoformat(),
        }
        for r in cur.fetchall()
    ]
    return {"count": int(count[0]) if count else 0, "latest": latest}


def print_status(as_json: bool = False) -> None:
    data = collect()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    errors = [q["error"] for q in data["queues"].values() if "error" in q]
    if errors and len(errors) == len(data["queues"]):
        # The broker or its management API is away: one fact, not one line per queue.
        console.print(f"[red]queue: {errors[0]} (no job queue readable)[/red]")
        data = {**data, "queues": {}}
    for name, q in data["queues"].items():
        if "error" in q:
            console.print(f"[red]queue {name}: {q['error']}[/red]")
        else:
            console.print(
                f"[bold]queue {name}[/bold] ready {q['ready']}  unacked {q['unacked']}  consumers {q['consumers']}"
            )
    if "dead_lettered" in data:
        console.print(f"[bold]dead-lettered[/bold] {data['dead_lettered']}")
    if data.get("outbox_pending"):
        # Jobs recorded but not yet confirmed by the broker: the watcher's next cycle sends them.
        console.print(f"[yellow]outbox pending {data['outbox_pending']}[/yellow]")
    if "database" in data:
        console.print(f"[red]database: {data['database']['error']}[/red]")
    scenes = Table(title="scenes")
    scenes.add_column("status")
    scenes.add_column("count", justify="right")
    for s, n in data["scenes"].items():
        scenes.add_row(s, str(n))
    console.print(scenes)
    if data.get("card_inputs"):
        inputs = Table(title="CARD inputs (Sentinel-1, not extracted themselves)")
        for col in ("kind", "status", "count"):
            inputs.add_column(col, justify="right" if col == "count" else "left")
        for kind, by_status in data["card_inputs"].items():
            for st, n in by_status.items():
                inputs.add_row(kind, st, str(n))
        console.print(inputs)
    workers = Table(title="workers")
    for col in ("id", "host", "pid", "state", "scene", "heartbeat age s", "metrics"):
        workers.add_column(col)
    for w in data["workers"]:
        age = f"[red]{w['heartbeat_age_s']} (stale)[/red]" if w["stale"] else str(w["heartbeat_age_s"])
        workers.add_row(
            w["id"], w["host"], str(w["pid"]), w["state"], str(w["current_scene"] or ""), age, w["metrics"] or ""
        )
    console.print(workers)
    for f in data["failed"]:
        console.print(f"[red]failed[/red] scene {f['scene_id']} {f['product_id']}: {f['reason']}")
    rejected = data["rejected"]
    if rejected["count"]:
        from rich.markup import escape

        console.print(f"[yellow]rejected catalogue items {rejected['count']}[/yellow] (latest first)")
        for r in rejected["latest"]:
            console.print(
                escape(f"  {r['source']}/{r['collection']}/{r['item_id']}: {r['reason']} (seen {r['seen_count']}x)")
            )
    if data.get("dead_lettered"):
        console.print("fix the cause, then `cbmflow jobs retry --dead-lettered` re-publishes those jobs")
