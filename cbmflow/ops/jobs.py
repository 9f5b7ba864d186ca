"""Re-publishing jobs after a fix (``cbmflow jobs retry``), and clearing the dead-letter queue of them.

Jobs are re-published through the outbox, like the watcher's: the scene reset and the outbox
row are committed together, then published with confirms. A dead letter is acknowledged (gone
from the dead-letter queue) only after the job replacing it was confirmed by the broker, so a
crash anywhere leaves either the dead letter or the new job, possibly both (a duplicate, which
the workers' claim makes harmless), never neither.

A reset bumps the scene's ``generation``, as the watcher's does for a changed product: a worker
that still believes it extracts the scene (say, one whose lease expired during a network
partition) then has its commit refused instead of marking the re-published job's scene done.

The dead-letter queue ends up holding exactly what still needs attention: letters of scenes that
are re-published or already finished are removed; malformed messages, unknown scenes, scenes a
worker is processing right now and scenes not asked for are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.errors import PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels, parse_message
from cbmflow.outbox import enqueue, flush_outbox
from cbmflow.settings import BusSettings

log = get_logger("jobs")

FINISHED = ("extracted", "no_parcels")


@dataclass
class RetryReport:
    republished: list[int] = field(default_factory=list)
    """Scenes reset and re-published (their outbox rows were confirmed by the broker)."""
    pending: list[int] = field(default_factory=list)
    """Scenes reset whose outbox rows the broker did not confirm (down): the next flush sends them."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Scenes asked for but not reset, with why (unknown, finished, in progress)."""
    letters_removed: int = 0
    letters_kept: int = 0
    letters_malformed: int = 0


def retry(
    dsn: str, bus: BusSettings, *, failed: bool = False, dead_lettered: bool = False, scenes: list[int] | None = None
) -> RetryReport:
    """Re-publish jobs: scenes in status ``failed`` (``failed``), scenes with a dead letter
    (``dead_lettered``), restricted to ``scenes`` when given; with neither flag, exactly ``scenes``
    (forced, even a finished scene: its rows are replaced, e.g. after a parcel fix)."""

    only = set(scenes or [])
    forced = not (failed or dead_lettered)
    if forced and not only:
        raise ValueError("nothing to retry: give failed, dead_lettered or scene ids")
    report = RetryReport()
    conn = busmod.connect(bus)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        busmod.declare_topology(channel, bus)
        letters = busmod.fetch_dead_letters(channel, bus)
        letter_scene: dict[int, int | None] = {}
        for letter in letters:
            try:
                msg = parse_message(letter.body)
            except PermanentJobError:
                msg = None
            letter_scene[letter.tag] = msg.scene_id if isinstance(msg, ExtractParcels) else None
        report.letters_malformed = sum(1 for s in letter_scene.values() if s is None)

        wanted: set[int] = set(only) if forced else set()
        outbox_ids: list[int] = []
        finished: set[int] = set()
        with db.transaction(dsn) as cur:
            if failed:
                cur.execute("SELECT id FROM scenes WHERE status = 'failed'")
                wanted |= {int(r[0]) for r in cur.fetchall()}
            if dead_lettered:
                wanted |= {s for s in letter_scene.values() if s is not None}
            if only:
                wanted &= only
            cur.execute(
                "SELECT id, product_id, card, location, status, lease_until > now() FROM scenes"
                " WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (sorted(wanted),),
            )
            rows = {int(r[0]): r for r in cur.fetchall()}
            for sid in sorted(wanted):
                row = rows.get(sid)
                if row is None:
                    report.skipped[sid] = "unknown scene"
                    continue
                _, product_id, card, location, status, lease_live = row
                if status == "processing" and lease_live:
                    report.skipped[sid] = "being processed now"
                    continue
                if status in FINISHED:
                    finished.add(sid)
                    if not forced:
                        report.skipped[sid] = f"already {status}"
                        continue
                msg = ExtractParcels(scene_id=sid, product_id=product_id, card=card, location=location)
                cur.execute(
                    "UPDATE scenes SET status = 'discovered', reason = NULL, lease_owner = NULL, lease_until = NULL,"
                    " generation = generation + 1, updated_at = now() WHERE id = %s",
                    (sid,),
                )
                outbox_ids.append(enqueue(cur, msg))
        if outbox_ids:
            flush_outbox(dsn, bus)
        with db.transaction(dsn) as cur:
            cur.execute(
                "SELECT (body->>'scene_id')::bigint, published_at IS NOT NULL FROM outbox WHERE id = ANY(%s)",
                (outbox_ids,),
            )
            for sid, done in cur.fetchall():
                (report.republished if done else report.pending).append(int(sid))
        report.republished.sort()
        report.pending.sort()
        # Letters whose scene now has a confirmed job, or needs none, go; everything else stays.
        settled = set(report.republished) | (finished - set(report.pending))
        for letter in letters:
            of = letter_scene[letter.tag]
            if of is not None and of in settled and (not only or of in only):
                channel.basic_ack(letter.tag)
                report.letters_removed += 1
            else:
                busmod.keep_dead_letter(channel, bus, letter)
                report.letters_kept += 1
    finally:
        if conn.is_open:
            conn.close()
    log.info(
        "jobs.retry",
        republished=report.republished,
        pending=report.pending,
        skipped=report.skipped,
        letters_removed=report.letters_removed,
        letters_kept=report.letters_kept,
    )
    return report
