"""Making the database agree with the dead-letter queue about jobs that killed their workers.

A job that kills its worker every time (out of memory, a segfault in a library) never reaches a
verdict: each death returns the message to the queue, and at the delivery limit the broker
dead-letters it (``x-death`` reason ``delivery_limit``) while its scene still says
``processing``, leased to a dead worker. No worker survives to record why, so the reason is
recovered from the dead-letter queue instead: a scene whose letter died of the delivery limit,
whose lease has expired (its last worker is gone) and which has not been reset since the letter
died (a changed product or a ``jobs retry`` made it new work) is marked ``failed`` with
"delivery limit reached (worker died N times)". Then ``cbmflow status`` lists it with its reason
and ``cbmflow jobs retry --dead-lettered`` re-publishes it, like any other dead letter.

The letters themselves are put back unchanged (headers and all): the queue stays the operator's
record of what needs attention. A scene whose lease is still live is left for the next pass.
``GenerateCard`` letters get the same treatment for their card input (``card_inputs``).
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.errors import PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels, GenerateCard, parse_message
from cbmflow.settings import BusSettings

log = get_logger("worker")

DELIVERY_LIMIT = "delivery_limit"


@dataclass
class ReconcileReport:
    letters: int = 0
    """Letters in the dead-letter queue at the start of the pass."""
    failed: list[int] = field(default_factory=list)
    """Scenes marked failed by this pass."""
    deferred: list[int] = field(default_factory=list)
    """Scenes of delivery-limit letters still under a live lease: judged by a later pass."""
    failed_inputs: list[int] = field(default_factory=list)
    """Card inputs (``GenerateCard`` letters) marked failed by this pass."""


def died_at(headers: dict[str, Any] | None) -> float | None:
    """When the broker dead-lettered the message (epoch seconds), from its ``x-death`` entry."""
    deaths = (headers or {}).get("x-death") or []
    when = deaths[0].get("time") if deaths and isinstance(deaths[0], dict) else None
    if isinstance(when, dt.datetime):
        # pika decodes AMQP timestamps as naive UTC datetimes
        return float(calendar.timegm(when.utctimetuple()))
    if isinstance(when, int | float):
        return float(when)
    return None


def reconcile_dead_letters(dsn: str, bus: BusSettings) -> ReconcileReport:
    """One pass over the dead-letter queue; see the module docstring for what is marked and why."""
    report = ReconcileReport()
    with db.advisory_lock(dsn, db.DEAD_LETTER_LOCK, wait=False) as ours:
        if not ours:  # `jobs retry` (or another pass) holds the letters now; the next period comes
            log.info("worker.dead_letters_busy")
            return report
        _reconcile(dsn, bus, report)
    return report


def _reconcile(dsn: str, bus: BusSettings, report: ReconcileReport) -> None:
    conn = busmod.connect(bus)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        busmod.declare_topology(channel, bus)
        letters = busmod.fetch_dead_letters(channel, bus)
        report.letters = len(letters)
        try:
            candidates: dict[int, float | None] = {}
            inputs: dict[int, float | None] = {}
            for letter in letters:
                if letter.death_reason != DELIVERY_LIMIT:
                    continue
                try:
                    msg = parse_message(letter.body)
                except PermanentJobError:
                    continue
                if isinstance(msg, ExtractParcels):
                    candidates[msg.scene_id] = died_at(letter.properties.headers)
                elif isinstance(msg, GenerateCard):
                    inputs[msg.card_input_id] = died_at(letter.properties.headers)
            if candidates:
                _mark_failed(dsn, candidates, report)
            if inputs:
                _mark_inputs_failed(dsn, inputs, report)
        finally:
            for letter in letters:
                busmod.keep_dead_letter(channel, bus, letter)
    finally:
        if conn.is_open:
            conn.close()


def _mark_failed(dsn: str, candidates: dict[int, float | None], report: ReconcileReport) -> None:
    with db.transaction(dsn) as cur:
        for scene_id, died in sorted(candidates.items()):
            # The SET expressions read the row as it was: attempts (claims by the workers that died)
            # and the last lease owner go into the reason. The second's slack: x-death times are
            # whole seconds; a reset after the death (jobs retry, a changed product) is newer.
            cur.execute(
                "UPDATE scenes SET status = 'failed',"
                "       reason = 'delivery limit reached (worker died ' || attempts || ' times; last worker '"
                "                || coalesce(lease_owner, 'unknown') || ')',"
                "       lease_owner = NULL, lease_until = NULL, updated_at = now()"
                " WHERE id = %(id)s AND status IN ('processing', 'queued', 'discovered')"
                "   AND (lease_until IS NULL OR lease_until < now())"
                "   AND (%(died)s::double precision IS NULL"
                "        OR updated_at < to_timestamp(%(died)s) + interval '1 second')"
                " RETURNING reason",
                {"id": scene_id, "died": died},
            )
            row = cur.fetchone()
            if row is not None:
                report.failed.append(scene_id)
                log.warning("job.dead_lettered_failed", scene_id=scene_id, reason=row[0])
                continue
            cur.execute("SELECT status = 'processing' AND lease_until >= now() FROM scenes WHERE id = %s", (scene_id,))
            live = cur.fetchone()
            if live is not None and live[0]:
                report.deferred.append(scene_id)


def _mark_inputs_failed(dsn: str, inputs: dict[int, float | None], report: ReconcileReport) -> None:
    """:func:`_mark_failed` for the card inputs of ``GenerateCard`` letters (a CARD job that killed its
    worker at every delivery: out of memory on a whole tile, say)."""
    with db.transaction(dsn) as cur:
        for input_id, died in sorted(inputs.items()):
            cur.execute(
                "UPDATE card_inputs SET status = 'failed',"
                "       reason = 'delivery limit reached (worker died ' || attempts || ' times; last worker '"
                "                || coalesce(lease_owner, 'unknown') || ')',"
                "       lease_owner = NULL, lease_until = NULL, updated_at = now()"
                " WHERE id = %(id)s AND status IN ('processing', 'queued', 'awaiting_card')"
                "   AND (lease_until IS NULL OR lease_until < now())"
                "   AND (%(died)s::double precision IS NULL"
                "        OR updated_at < to_timestamp(%(died)s) + interval '1 second')"
                " RETURNING reason",
                {"id": input_id, "died": died},
            )
            row = cur.fetchone()
            if row is not None:
                report.failed_inputs.append(input_id)
                log.warning("job.dead_lettered_failed", card_input_id=input_id, reason=row[0])
