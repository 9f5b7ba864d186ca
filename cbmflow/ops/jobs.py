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

CARD jobs (``GenerateCard``) get the same treatment for their card input: a failed or
dead-lettered input goes back to ``awaiting_card`` with its generation bumped and a new job in the
outbox, and its letter goes once that job is confirmed: ``bs`` for a GRD, ``coh`` for an SLC the
watcher has paired (its partner is read from the row, as the worker does); an SLC without a
partner has no job to re-publish and is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.errors import PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels, GenerateCard, parse_message
from cbmflow.outbox import enqueue, flush_outbox
from cbmflow.settings import BusSettings

log = get_logger("jobs")

FINISHED = ("extracted", "no_parcels")
CARD_FINISHED = ("done",)


@dataclass
class RetryReport:
    republished: list[int] = field(default_factory=list)
    """Scenes reset and re-published (their outbox rows were confirmed by the broker)."""
    pending: list[int] = field(default_factory=list)
    """Scenes reset whose outbox rows the broker did not confirm (down): the next flush sends them."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Scenes asked for but not reset, with why (unknown, finished, in progress)."""
    cards_republished: list[int] = field(default_factory=list)
    """Card inputs reset and their ``GenerateCard`` jobs confirmed by the broker."""
    cards_pending: list[int] = field(default_factory=list)
    cards_skipped: dict[int, str] = field(default_factory=dict)
    letters_removed: int = 0
    letters_kept: int = 0
    letters_malformed: int = 0


def retry(
    dsn: str,
    bus: BusSettings,
    *,
    failed: bool = False,
    dead_lettered: bool = False,
    scenes: list[int] | None = None,
    card_inputs: list[int] | None = None,
) -> RetryReport:
    """Re-publish jobs: scenes and card inputs in status ``failed`` (``failed``), those with a dead
    letter (``dead_lettered``), restricted to ``scenes`` / ``card_inputs`` when either is given; with
    neither flag, exactly those ids (forced, even when finished: a scene's rows are replaced, e.g.
    after a parcel fix; a card input's COGs and scenes are regenerated)."""

    only = set(scenes or [])
    only_cards = set(card_inputs or [])
    restricted = bool(only or only_cards)
    forced = not (failed or dead_lettered)
    if forced and not restricted:
        raise ValueError("nothing to retry: give failed, dead_lettered, scene ids or card input ids")
    report = RetryReport()
    # The workers' reconciliation pass holds the letters for a moment each period: wait for it
    # rather than read a queue short of them (and re-publish nothing).
    with db.advisory_lock(dsn, db.DEAD_LETTER_LOCK, wait=True):
        _retry(dsn, bus, report, failed, dead_lettered, forced, restricted, only, only_cards)
    log.info(
        "jobs.retry",
        republished=report.republished,
        pending=report.pending,
        skipped=report.skipped,
        cards_republished=report.cards_republished,
        cards_pending=report.cards_pending,
        cards_skipped=report.cards_skipped,
        letters_removed=report.letters_removed,
        letters_kept=report.letters_kept,
    )
    return report


def _retry(
    dsn: str,
    bus: BusSettings,
    report: RetryReport,
    failed: bool,
    dead_lettered: bool,
    forced: bool,
    restricted: bool,
    only: set[int],
    only_cards: set[int],
) -> None:
    conn = busmod.connect(bus)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        busmod.declare_topology(channel, bus)
        letters = busmod.fetch_dead_letters(channel, bus)
        letter_scene: dict[int, int | None] = {}
        letter_card: dict[int, int | None] = {}
        for letter in letters:
            try:
                msg = parse_message(letter.body)
            except PermanentJobError:
                msg = None
            letter_scene[letter.tag] = msg.scene_id if isinstance(msg, ExtractParcels) else None
            letter_card[letter.tag] = msg.card_input_id if isinstance(msg, GenerateCard) else None
        report.letters_malformed = sum(
            1 for tag in letter_scene if letter_scene[tag] is None and letter_card[tag] is None
        )

        wanted: set[int] = set(only) if forced else set()
        wanted_cards: set[int] = set(only_cards) if forced else set()
        outbox_ids: list[int] = []
        finished: set[int] = set()
        with db.transaction(dsn) as cur:
            if failed:
                cur.execute("SELECT id FROM scenes WHERE status = 'failed'")
                wanted |= {int(r[0]) for r in cur.fetchall()}
                cur.execute("SELECT id FROM card_inputs WHERE status = 'failed' AND deleted_at IS NULL")
                wanted_cards |= {int(r[0]) for r in cur.fetchall()}
            if dead_lettered:
                wanted |= {s for s in letter_scene.values() if s is not None}
                wanted_cards |= {c for c in letter_card.values() if c is not None}
            if restricted:
                wanted &= only
                wanted_cards &= only_cards
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
                why, done = _not_resettable(status, bool(lease_live), FINISHED, forced)
                if done:
                    finished.add(sid)
                if why is not None:
                    report.skipped[sid] = why
                    continue
                msg = ExtractParcels(scene_id=sid, product_id=product_id, card=card, location=location)
                cur.execute(
                    "UPDATE scenes SET status = 'discovered', reason = NULL, lease_owner = NULL, lease_until = NULL,"
                    " generation = generation + 1, updated_at = now() WHERE id = %s",
                    (sid,),
                )
                outbox_ids.append(enqueue(cur, msg))
            finished_cards = _reset_card_inputs(cur, sorted(wanted_cards), forced, report, outbox_ids)
        if outbox_ids:
            flush_outbox(dsn, bus)
        with db.transaction(dsn) as cur:
            cur.execute(
                "SELECT kind, coalesce(body->>'scene_id', body->>'card_input_id')::bigint, published_at IS NOT NULL"
                " FROM outbox WHERE id = ANY(%s)",
                (outbox_ids,),
            )
            for kind, of_id, done in cur.fetchall():
                if kind == "GenerateCard":
                    (report.cards_republished if done else report.cards_pending).append(int(of_id))
                else:
                    (report.republished if done else report.pending).append(int(of_id))
        for ids in (report.republished, report.pending, report.cards_republished, report.cards_pending):
            ids.sort()
        # Letters whose scene or card input now has a confirmed job, or needs none, go; the rest stays.
        settled = set(report.republished) | (finished - set(report.pending))
        settled_cards = set(report.cards_republished) | (finished_cards - set(report.cards_pending))
        for letter in letters:
            of, card_of = letter_scene[letter.tag], letter_card[letter.tag]
            if (of is not None and of in settled and (not restricted or of in only)) or (
                card_of is not None and card_of in settled_cards and (not restricted or card_of in only_cards)
            ):
                channel.basic_ack(letter.tag)
                report.letters_removed += 1
            else:
                busmod.keep_dead_letter(channel, bus, letter)
                report.letters_kept += 1
    finally:
        if conn.is_open:
            conn.close()


def _not_resettable(
    status: str, lease_live: bool, finished_states: Collection[str], forced: bool
) -> tuple[str | None, bool]:
    """Why a scene or card input is left as it is (None: reset it), and whether it is finished.
    A live lease means a worker is on it now; a finished one is redone only when asked by id."""
    if status == "processing" and lease_live:
        return "being processed now", False
    if status in finished_states:
        return (None if forced else f"already {status}"), True
    return None, False


def _reset_card_inputs(
    cur: db.Cursor, wanted: list[int], forced: bool, report: RetryReport, outbox_ids: list[int]
) -> set[int]:
    """Reset the wanted card inputs and write their jobs; returns those already done (not forced)."""
    finished: set[int] = set()
    if not wanted:
        return finished
    cur.execute(
        "SELECT ci.id, ci.product_id, ci.kind, ci.location, ci.status, ci.lease_until > now(),"
        "       ci.deleted_at IS NOT NULL, ci.partner_input_id, p.location"
        " FROM card_inputs ci LEFT JOIN card_inputs p ON p.id = ci.partner_input_id"
        " WHERE ci.id = ANY(%s) ORDER BY ci.id FOR UPDATE OF ci",
        (wanted,),
    )
    rows = {int(r[0]): r for r in cur.fetchall()}
    for input_id in wanted:
        row = rows.get(input_id)
        if row is None:
            report.cards_skipped[input_id] = "unknown card input"
            continue
        _, product_id, kind, location, status, lease_live, deleted, partner_id, partner_location = row
        if deleted:
            report.cards_skipped[input_id] = "deleted from the catalogue"
            continue
        if kind == "slc" and partner_id is None:
            report.cards_skipped[input_id] = "an SLC without a coherence partner (6 or 12 days earlier) yet"
            continue
        if kind not in ("grd", "slc"):
            report.cards_skipped[input_id] = f"a {kind} input has no CARD job"
            continue
        why, done = _not_resettable(status, bool(lease_live), CARD_FINISHED, forced)
        if done:
            finished.add(input_id)
        if why is not None:
            report.cards_skipped[input_id] = why
            continue
        cur.execute(
            "UPDATE card_inputs SET status = 'awaiting_card', reason = NULL, lease_owner = NULL, lease_until = NULL,"
            " generation = generation + 1, updated_at = now() WHERE id = %s",
            (input_id,),
        )
        msg = (
            GenerateCard(card_input_id=input_id, product_id=product_id, card="bs", location=location)
            if kind == "grd"
            else GenerateCard(
                card_input_id=input_id,
                product_id=product_id,
                card="coh",
                location=location,
                partner_input_id=partner_id,
                partner_location=partner_location,
            )
        )
        outbox_ids.append(enqueue(cur, msg))
    return finished
