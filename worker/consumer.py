"""The job consumer: claim, extract, acknowledge, with heartbeats that never starve.

pika's BlockingConnection is not thread-safe, so the job runs in a thread of its own while the
connection's thread keeps calling ``process_data_events`` (broker heartbeats are answered during
long jobs). The job thread never touches the channel: it stores its verdict and wakes the
connection thread with ``add_callback_threadsafe``; the connection thread settles it. Because
the verdict is held by the job record rather than by a queued callback, a verdict can never be
lost in a dead connection's callback queue, and the connection thread always knows whether a
job is still running.

Verdicts: ``ack`` (done, or a duplicate of a finished scene), ``requeue`` (transient failure of
this job, after a backoff) and ``dead_letter`` (permanent failure: ``basic_reject(requeue=False)``
goes straight to the dead-letter exchange, with the reason recorded on the scene). A database
or an object store that cannot be reached at all is not the job's fault: the job keeps its
message (and its lease) and retries in place, so an outage never uses up the message's delivery
limit.

A job holds no transaction while it reads and reduces rasters: the claim is one short
transaction, the extraction reads in autocommit and spools its rows, and the write is one short
transaction that re-checks the lease and the scene's generation before it commits (a product the
watcher found changed meanwhile is extracted again, never marked done by the stale job).

A job that kills its worker every time (out of memory) never reaches a verdict; the broker
dead-letters it at its delivery limit. One worker per lease period (fleet-wide) reconciles the
scenes of such letters (:mod:`worker.deadletters`), so the database and the dead-letter queue agree.

At most one job runs per process, also across reconnects: after a lost connection the consumer
waits for the job thread to finish (its lease keeps other workers off the scene meanwhile, and
the broker has already requeued the message, whose redelivery is acked as a duplicate) before
it consumes again.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar

import pika
import pika.exceptions
import psycopg2
import psycopg2.extensions
import structlog

from cbmflow import bus as busmod
from cbmflow import db, store
from cbmflow.errors import ConfigError, PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.messages import JOB_KINDS, ExtractParcels, GenerateCard, parse_message
from cbmflow.outbox import flush_outbox
from cbmflow.settings import BusSettings, DbSettings, WorkerSettings
from worker.cardjob import CardJobs, ClaimedInput, UnknownCardInput, UnsupportedCardJob
from worker.cardjob_coh import CardJobsWithCoh
from worker.deadletters import reconcile_dead_letters
from worker.index_cache import IndexCache
from worker.leases import LeaseHeld, LeaseLost, SceneChanged
from worker.metrics import WorkerMetrics
from worker.scene import ClaimedScene, RowSink, RowSpool, SceneResult, extract_card, extract_s2

log = get_logger("worker")

# SQLSTATEs that mean "the database is not there right now" rather than "this job is bad":
# connection exceptions (08), operator/crash shutdown and startup (57P01-57P03), insufficient
# resources (53: disk full, out of memory, too many connections).
_DB_UNAVAILABLE_PREFIXES = ("08", "53", "57P01", "57P02", "57P03")

EXIT_UNREACHABLE = 75
"""Exit status of a worker that gave up on a broker and a database both gone (EX_TEMPFAIL): non-zero,
so a supervisor (systemd's Restart=on-failure on a VM) sees a failure rather than a clean drain."""


W = TypeVar("W")


@dataclass
class Verdict:
    """What to tell the broker about one delivery, and why (``label`` is the metrics label)."""

    action: str  # "ack" | "requeue" | "dead_letter"
    reason: str = ""
    label: str = ""


@dataclass(frozen=True)
class _JobSteps(Generic[W]):
    """What differs between the job kinds (an extraction, a CARD generation); the verdicts around
    them are one loop, :meth:`Worker._verdicts`, so both kinds answer the broker alike."""

    claim: Callable[[psycopg2.extensions.connection], tuple[W, int] | None]
    """The work and its generation, or None when it is already finished (a duplicate job)."""
    start: Callable[[psycopg2.extensions.connection, W], None]
    """Shows the work as this worker's current one (heartbeats, status)."""
    run: Callable[[psycopg2.extensions.connection, W], dict[str, Any] | None]
    """The outcome, or None when stopping during an object-store outage."""
    done: Callable[[dict[str, Any], float, float], Verdict]
    """Logs and answers a finished job: (outcome, wall seconds, process CPU seconds meanwhile)."""
    label: Callable[[PermanentJobError], str]
    record: Callable[[psycopg2.extensions.connection, str, bool, int | None], None]
    """Records a failure on the work (reason, permanent, the generation claimed)."""
    release: Callable[[], None]


class UnknownScene(PermanentJobError):
    """The job names a scene the database does not have (a foreign or stale message)."""


class UnknownStoreProfile(PermanentJobError):
    """The scene's store profile is not configured in this worker (``CBMFLOW_STORE_PROFILES``)."""


class UnsupportedCard(PermanentJobError):
    """The scene is of a product type this worker cannot extract yet."""


# How each card is extracted: Sentinel-2 L2A SAFE, Sentinel-1 CARD backscatter and 6-/12-day coherence.
EXTRACTORS: dict[str, Callable[[psycopg2.extensions.cursor, ClaimedScene, IndexCache, RowSink], SceneResult]] = {
    "s2": extract_s2,
    "bs": extract_card,
    "c6": extract_card,
    "c12": extract_card,
}


def worker_id() -> str:
    return os.environ.get("CBMFLOW_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


def backoff_s(attempt: int, ceiling_s: float) -> float:
    """1, 2, 4 … s up to ``ceiling_s``, minus up to 20 % jitter, so that workers coming back from a
    shared outage do not all retry in the same instant."""
    return min(2.0 ** max(attempt - 1, 0), ceiling_s) * random.uniform(0.8, 1.0)  # noqa: S311 - not crypto


def db_unavailable(exc: psycopg2.Error, conn: psycopg2.extensions.connection | None) -> bool:
    """Whether ``exc`` says the database is unreachable, as opposed to this job failing in it."""
    if conn is None or conn.closed:
        return True
    code = exc.pgcode or ""
    return not code or code.startswith(_DB_UNAVAILABLE_PREFIXES)


class SceneJobs:
    """Database side of a job: claim with a lease, renew it, finish or fail the scene."""

    def __init__(self, dsn: str, me: str, settings: WorkerSettings) -> None:
        self.dsn = dsn
        self.me = me
        self.settings = settings
        self.cache = IndexCache(settings.index_cache_entries)

    def claim(self, conn: psycopg2.extensions.connection, msg: ExtractParcels) -> ClaimedScene | None:
        """Claim the scene, or return None when it is already finished (a duplicate job).

        A scene in ``processing`` whose lease expired belonged to a crashed worker and is taken
        over; one with a live lease raises :class:`LeaseHeld`. Our own live lease is re-claimed:
        that is a job retried in place after the database came back.
        """
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET status = 'processing', lease_owner = %(me)s,"
                "       lease_until = now() + make_interval(secs => %(lease)s), attempts = attempts + 1,"
                "       updated_at = now(), reason = NULL"
                " WHERE id = %(id)s AND (status IN ('discovered', 'queued', 'failed')"
                "       OR (status = 'processing' AND (lease_until < now() OR lease_owner = %(me)s)))"
                " RETURNING product_id, card, location, extract(year FROM acquired_at AT TIME ZONE 'UTC')::int,"
                "           generation, coalesce(store_profile, '')",
                {"me": self.me, "lease": self.settings.lease_s, "id": msg.scene_id},
            )
            row = cur.fetchone()
            if row is not None:
                return ClaimedScene(
                    id=msg.scene_id,
                    product_id=row[0],
                    card=row[1],
                    location=row[2],
                    year=row[3],
                    generation=row[4],
                    store_profile=row[5],
                )
            cur.execute(
                "SELECT status, extract(epoch FROM lease_until - now()) FROM scenes WHERE id = %s", (msg.scene_id,)
            )
            found = cur.fetchone()
        if found is None:
            raise UnknownScene(f"unknown scene {msg.scene_id}")
        status, remaining = found
        if status in ("extracted", "no_parcels"):
            return None
        raise LeaseHeld(float(remaining or 0.0))

    def renew(self, conn: psycopg2.extensions.connection, scene_id: int) -> bool:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET lease_until = now() + make_interval(secs => %s)"
                " WHERE id = %s AND lease_owner = %s AND status = 'processing'",
                (self.settings.lease_s, scene_id, self.me),
            )
            return bool(cur.rowcount == 1)

    def run(self, conn: psycopg2.extensions.connection, scene: ClaimedScene) -> dict[str, Any]:
        """Extract outside any transaction, then write the rows and mark the scene done in ONE short
        transaction, committed only if we still hold the lease on the generation we claimed.

        The extraction's few queries run in autocommit (each its own instant transaction) and its
        rows are spooled (:class:`worker.scene.RowSpool`), so nothing is held open while rasters
        are read and reduced: no snapshot holding back vacuum, nothing for
        ``idle_in_transaction_session_timeout`` to kill. The write transaction checks the scene
        before deleting anything (a stale job is refused cheaply) and again under ``FOR UPDATE``
        just before its commit. The row is locked only then: locking it earlier would block the
        heartbeat's lease renewal for as long as the COPY waits. A worker that lost its lease
        (another took over) or whose scene changed (the watcher bumped its generation) rolls back
        its rows, so exactly one writer commits, and it wrote the current version.
        """
        extract = EXTRACTORS.get(scene.card)
        if extract is None:
            raise UnsupportedCard(f"card {scene.card!r} is not supported by this worker yet")
        try:
            store.profile_settings(scene.store_profile)
        except store.UnknownStoreProfile as exc:
            raise UnknownStoreProfile(f"scene {scene.id} ({scene.product_id}): {exc}") from exc
        spool = RowSpool()
        try:
            conn.autocommit = True
            try:
                with store.using_profile(scene.store_profile), conn.cursor() as cur:
                    result = extract(cur, scene, self.cache, spool)
            finally:
                if not conn.closed:
                    conn.autocommit = False
            with conn, conn.cursor() as cur:
                self._check_current(cur, scene, lock=False)
                spool.write(cur, scene.id)
                self._check_current(cur, scene, lock=True)
                status = "extracted" if result.sig_rows or result.hist_rows else "no_parcels"
                cur.execute(
                    "UPDATE scenes SET status = %s, rows_written = %s, lease_owner = NULL, lease_until = NULL,"
                    " reason = NULL, updated_at = now() WHERE id = %s",
                    (status, result.sig_rows + result.hist_rows, scene.id),
                )
        finally:
            spool.close()
        return {
            "status": status,
            "datasets": result.datasets,
            "parcels": result.parcels,
            "sig_rows": result.sig_rows,
            "hist_rows": result.hist_rows,
        }

    def _check_current(self, cur: psycopg2.extensions.cursor, scene: ClaimedScene, *, lock: bool) -> None:
        """Raise unless the scene is still ours, at the generation we claimed."""
        if lock:
            cur.execute("SELECT lease_owner, generation FROM scenes WHERE id = %s FOR UPDATE", (scene.id,))
        else:
            cur.execute("SELECT lease_owner, generation FROM scenes WHERE id = %s", (scene.id,))
        row = cur.fetchone()
        if row is None or row[1] != scene.generation:
            raise SceneChanged(f"scene {scene.id} changed (generation {scene.generation} -> {row and row[1]})")
        if row[0] != self.me:
            raise LeaseLost(0.0)  # rolls back this transaction's rows

    def note(self, conn: psycopg2.extensions.connection, scene: ClaimedScene, reason: str) -> None:
        """Show why a job we still hold is waiting (``scenes.reason``), without giving up the scene."""
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET reason = %s, updated_at = now()"
                " WHERE id = %s AND lease_owner = %s AND generation = %s AND status = 'processing'",
                (reason[:2000], scene.id, self.me, scene.generation),
            )

    def fail(
        self,
        conn: psycopg2.extensions.connection,
        scene_id: int,
        reason: str,
        permanent: bool,
        generation: int | None = None,
    ) -> None:
        """Record the reason; ``failed`` for good, or back to ``queued`` for the next delivery.

        With the claimed ``generation``, a scene the watcher reset meanwhile (a new version, with
        its own job) is left alone: the failure was the old version's.
        """
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET status = %s, reason = %s, lease_owner = NULL, lease_until = NULL,"
                " updated_at = now() WHERE id = %s AND (lease_owner = %s OR lease_owner IS NULL)"
                " AND (%s::bigint IS NULL OR generation = %s)",
                ("failed" if permanent else "queued", reason[:2000], scene_id, self.me, generation, generation),
            )


@dataclass
class Delivery:
    """One message handed to this worker, and (once its job ended) the verdict for it."""

    channel: Any
    connection: pika.BlockingConnection
    tag: int
    body: bytes
    message_id: str | None
    delivery_count: int
    verdict: Verdict | None = None
    duration_s: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)


class Worker:
    """One consumer process. SIGTERM (or the drain file, or ``workers.state = 'draining'``)
    stops consuming, lets the current job finish within a deadline, and exits cleanly."""

    def __init__(
        self,
        dsn: str | None = None,
        bus: BusSettings | None = None,
        settings: WorkerSettings | None = None,
        max_jobs: int = 0,
    ) -> None:
        self.dsn = dsn or DbSettings().resolved_dsn()
        self.bus = bus or BusSettings()
        self.settings = settings or WorkerSettings()
        self.me = worker_id()
        self.jobs = SceneJobs(self.dsn, self.me, self.settings)
        self.card_jobs: CardJobs = CardJobsWithCoh(self.dsn, self.me, self.settings)
        self.metrics = WorkerMetrics(self.me)
        self.metrics_port: int | None = None
        self.max_jobs = max_jobs
        self.done = 0
        self.stopping = threading.Event()
        self.exited = threading.Event()
        self.busy = threading.Event()
        self.current_scene: int | None = None
        self.current_card_input: int | None = None
        """The card input whose lease the heartbeat renews while a GenerateCard job runs."""
        self._stop_at: float | None = None
        self._conn: pika.BlockingConnection | None = None
        self._job: Delivery | None = None
        self._pending: deque[Delivery] = deque()
        self._secondary: dict[str, str] = {}
        """Queues consumed with callbacks besides the first (several job kinds) → consumer tag, "" paused."""
        self._secondary_cancelled = False
        self.queues()  # an unknown job kind fails here, before anything is started
        self._reconnect_attempt = 0
        self._last_job_end = time.monotonic()
        # Since when the broker / the database could not be reached (None: reachable as far as we
        # know). Only both at once, without a break, count towards ``unreachable_exit_s``.
        self._broker_down_since: float | None = None
        self._db_down_since: float | None = None
        self.gave_up = False

    # ---- registry -------------------------------------------------------------------------
    def _registry(self, state: str) -> None:
        """Upsert this worker's row. A drain request (``draining``, set by the provisioner) sticks
        until the process stops, even across reconnects and restarts under the same id."""
        try:
            with db.transaction(self.dsn) as cur:
                cur.execute(
                    "INSERT INTO workers (id, host, pid, state, current_scene, metrics_port)"
                    " VALUES (%(id)s, %(host)s, %(pid)s, %(state)s, %(scene)s, %(port)s)"
                    " ON CONFLICT (id) DO UPDATE SET"
                    "  state = CASE WHEN workers.state = 'draining' AND EXCLUDED.state <> 'stopped'"
                    "               THEN 'draining' ELSE EXCLUDED.state END,"
                    "  current_scene = EXCLUDED.current_scene, heartbeat_at = now(), pid = EXCLUDED.pid,"
                    "  host = EXCLUDED.host, metrics_port = EXCLUDED.metrics_port,"
                    "  started_at = CASE WHEN workers.pid <> EXCLUDED.pid OR workers.host <> EXCLUDED.host"
                    "                    THEN now() ELSE workers.started_at END"
                    " RETURNING state",
                    {
                        "id": self.me,
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "state": state,
                        "scene": self.current_scene,
                        "port": self.metrics_port,
                    },
                )
                row = cur.fetchone()
        except psycopg2.Error as exc:
            self._note_db(reachable=not isinstance(exc, psycopg2.OperationalError))
            log.warning("worker.registry_failed", error=str(exc).strip()[:300])
            return
        self._note_db(reachable=True)
        if row is not None and row[0] == "draining" and state != "draining" and not self.stopping.is_set():
            log.info("worker.drain_requested", source="registry")
            self.request_stop()

    def _mark(self, conn: psycopg2.extensions.connection, state: str, scene_id: int | None) -> None:
        """Show busy/idle at once (``cbmflow status``, the provisioner) rather than at the next heartbeat."""
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE workers SET state = CASE WHEN state = 'draining' THEN state ELSE %s END,"
                " current_scene = %s, heartbeat_at = now() WHERE id = %s",
                (state, scene_id, self.me),
            )

    def _heartbeat_loop(self) -> None:
        """Keep the registry row fresh, renew the current lease, and notice a drain request.

        Runs until the process exits, not until a stop is requested: a draining worker's job may
        run for the whole stop deadline, and its lease and heartbeat must stay fresh meanwhile.
        """
        structlog.contextvars.bind_contextvars(worker_id=self.me)
        conn: psycopg2.extensions.connection | None = None
        while not self.exited.wait(self.settings.heartbeat_s):
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.dsn)
                with conn, conn.cursor() as cur:
                    state = "busy" if self.busy.is_set() else "idle"
                    cur.execute(
                        "UPDATE workers SET heartbeat_at = now(),"
                        " state = CASE WHEN state IN ('draining', 'stopped') THEN state ELSE %s END,"
                        " current_scene = %s"
                        " WHERE id = %s RETURNING state",
                        (state, self.current_scene, self.me),
                    )
                    row = cur.fetchone()
                self._note_db(reachable=True)
                if row is None:
                    self._registry(state)  # the row was deleted under us (or never written): recreate it
                elif row[0] == "draining" and not self.stopping.is_set():
                    log.info("worker.drain_requested", source="registry")
                    self.request_stop()
                scene = self.current_scene
                if scene is not None and not self.jobs.renew(conn, scene) and self.current_scene == scene:
                    log.warning("worker.lease_lost", scene_id=scene)  # the job finds out at its commit
                card_input = self.current_card_input
                if (
                    card_input is not None
                    and not self.card_jobs.renew(conn, card_input)
                    and self.current_card_input == card_input
                ):
                    log.warning("worker.lease_lost", card_input_id=card_input)
            except psycopg2.Error as exc:
                self._note_db(reachable=not db_unavailable(exc, conn))
                log.warning("worker.heartbeat_failed", error=str(exc).strip()[:300])
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _dead_letter_loop(self) -> None:
        """Once per lease period, fleet-wide, mark the scenes of jobs the broker dead-lettered at
        their delivery limit as failed (see :mod:`worker.deadletters`).

        Every worker wakes up, but only the one that wins ``worker_tasks``' slot for the period does
        the pass, so the dead-letter queue is read once per period however many workers run. The
        lease period is the natural pace: a dead worker's scene can only be judged once its lease
        has expired. Failures are logged and retried next period; they never touch the job.
        """
        structlog.contextvars.bind_contextvars(worker_id=self.me)
        period_s = max(self.settings.lease_s, 1.0)
        while not self.exited.wait(period_s * random.uniform(0.8, 1.0)):  # noqa: S311 - not crypto
            try:
                if not self._won_task("dead_letters", period_s):
                    continue
                report = reconcile_dead_letters(self.dsn, self.bus)
            except Exception as exc:  # noqa: BLE001 - housekeeping must never stop the worker
                log.warning("worker.dead_letters_failed", error=str(exc).strip()[:300] or type(exc).__name__)
                continue
            if report.failed or report.deferred or report.failed_inputs:
                log.info(
                    "worker.dead_letters_reconciled",
                    letters=report.letters,
                    failed=report.failed,
                    deferred=report.deferred,
                    failed_card_inputs=report.failed_inputs,
                )

    def _won_task(self, task: str, period_s: float) -> bool:
        """Whether this worker runs ``task`` now: true for the first to ask in each period."""
        with db.transaction(self.dsn) as cur:
            cur.execute(
                "INSERT INTO worker_tasks (task, last_run_at) VALUES (%(task)s, now())"
                " ON CONFLICT (task) DO UPDATE SET last_run_at = now()"
                " WHERE worker_tasks.last_run_at < now() - make_interval(secs => %(min_s)s)"
                " RETURNING task",
                {"task": task, "min_s": 0.7 * period_s},
            )
            return cur.fetchone() is not None

    # ---- control --------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        if not self.stopping.is_set():
            self._stop_at = time.monotonic()
            self.stopping.set()

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("worker.signal", signal=signal.Signals(signum).name)
        self.request_stop()

    def _note_db(self, *, reachable: bool) -> None:
        if reachable:
            self._db_down_since = None
        elif self._db_down_since is None:
            self._db_down_since = time.monotonic()

    def _probe_db(self) -> None:
        """One connection attempt, so the database's state is current when the broker is gone."""
        try:
            db.connect(self.dsn).close()
        except psycopg2.Error:
            self._note_db(reachable=False)
        else:
            self._note_db(reachable=True)

    def _unreachable_s(self) -> float:
        """How long the broker and the database have both been unreachable (0 while either answers)."""
        broker, database = self._broker_down_since, self._db_down_since
        if broker is None or database is None:
            return 0.0
        return time.monotonic() - max(broker, database)

    def _give_up_if_unreachable(self) -> bool:
        """Stop for good once both have been gone longer than ``unreachable_exit_s``.

        A worker whose stack was taken down (``cbmflow stack down``, a deleted deployment) would
        otherwise retry forever; one server restarting alone never gets here, because the other
        still answers.
        """
        limit = self.settings.unreachable_exit_s
        if self.gave_up or not limit:
            return self.gave_up
        unreachable_s = self._unreachable_s()
        if unreachable_s < limit:
            return False
        self.gave_up = True
        log.error(
            "worker.giving_up",
            unreachable_s=round(unreachable_s, 1),
            limit_s=limit,
            exit_code=EXIT_UNREACHABLE,
            reason="the broker and the database have both been unreachable since then",
        )
        self.request_stop()
        return True

    def _retry_in_s(self, delay_s: float) -> float:
        """The reconnect backoff, cut short so the give-up check runs on time."""
        limit = self.settings.unreachable_exit_s
        if not limit or self._broker_down_since is None or self._db_down_since is None:
            return delay_s
        return max(min(delay_s, limit - self._unreachable_s()), 0.1)

    def _drain_file_present(self) -> bool:
        return bool(self.settings.drain_file) and Path(self.settings.drain_file).exists()

    def _past_stop_deadline(self) -> bool:
        return self._stop_at is not None and time.monotonic() - self._stop_at > self.settings.stop_deadline_s

    # ---- the job (job thread) -------------------------------------------------------------
    def _job_main(self, job: Delivery) -> None:
        structlog.contextvars.bind_contextvars(
            worker_id=self.me, job_id=job.message_id, delivery_count=job.delivery_count
        )
        started = time.monotonic()
        verdict = Verdict("requeue", "job thread ended without a verdict", "unexpected")
        try:
            verdict = self._handle(job)
        except Exception as exc:  # noqa: BLE001 - the verdict must always reach the connection thread
            log.exception("job.crashed")
            verdict = Verdict("requeue", f"{type(exc).__name__}: {exc}", "unexpected")
        finally:
            job.duration_s = time.monotonic() - started
            job.verdict = verdict
            job.finished.set()
            try:
                job.connection.add_callback_threadsafe(self._settle_finished)
            except pika.exceptions.ConnectionWrongStateError:
                pass  # the connection died under the job; the connection thread is waiting for it
            # The job's keys (scene, product, delivery) must not stick to whatever this thread logs next.
            structlog.contextvars.clear_contextvars()

    def _handle(self, job: Delivery) -> Verdict:
        try:
            msg = parse_message(job.body)
        except PermanentJobError as exc:
            log.error("job.malformed", error=str(exc)[:500], body_prefix=repr(job.body[:64]))
            return Verdict("dead_letter", str(exc), "malformed")
        if isinstance(msg, GenerateCard):
            return self._handle_card(job, msg)
        if not isinstance(msg, ExtractParcels):
            log.error("job.malformed", error=f"unexpected message kind {msg.kind}")
            return Verdict("dead_letter", f"unexpected message kind {msg.kind}", "malformed")
        structlog.contextvars.bind_contextvars(scene_id=msg.scene_id, product_id=msg.product_id)

        def claim(conn: psycopg2.extensions.connection) -> tuple[ClaimedScene, int] | None:
            scene = self.jobs.claim(conn, msg)
            return None if scene is None else (scene, scene.generation)

        def start(conn: psycopg2.extensions.connection, scene: ClaimedScene) -> None:
            self.current_scene = scene.id
            self._mark(conn, "busy", scene.id)

        def done(outcome: dict[str, Any], duration_s: float, cpu_s: float) -> Verdict:
            log.info("job.done", duration_s=round(duration_s, 3), cpu_s=round(cpu_s, 3), **outcome)
            return Verdict("ack", "", str(outcome["status"]))

        def label(exc: PermanentJobError) -> str:
            return (
                "unsupported"
                if isinstance(exc, UnsupportedCard)
                else "unknown_scene"
                if isinstance(exc, UnknownScene)
                else "product"
            )

        def release() -> None:
            self.current_scene = None

        return self._verdicts(
            job,
            _JobSteps(
                claim=claim,
                start=start,
                run=lambda conn, scene: self._through_store_outages(
                    conn, scene, self.jobs.run, self.jobs.note, scene.location
                ),
                done=done,
                label=label,
                record=lambda conn, reason, permanent, gen: self.jobs.fail(conn, msg.scene_id, reason, permanent, gen),
                release=release,
            ),
        )

    def _handle_card(self, job: Delivery, msg: GenerateCard) -> Verdict:
        """A ``GenerateCard`` job (``worker/cardjob.py``), with the extraction job's verdicts (see
        :meth:`_verdicts`). After the commit the scenes' extraction jobs are published (best effort:
        the watcher's next outbox flush publishes what this worker may not)."""
        structlog.contextvars.bind_contextvars(card_input_id=msg.card_input_id, product_id=msg.product_id)

        def claim(conn: psycopg2.extensions.connection) -> tuple[ClaimedInput, int] | None:
            claimed = self.card_jobs.claim(conn, msg)
            return None if claimed is None else (claimed, claimed.generation)

        def start(conn: psycopg2.extensions.connection, claimed: ClaimedInput) -> None:
            self.current_card_input = claimed.id
            self._mark(conn, "busy", None)

        def done(outcome: dict[str, Any], duration_s: float, cpu_s: float) -> Verdict:
            log.info("job.done", kind="GenerateCard", duration_s=round(duration_s, 3), cpu_s=round(cpu_s, 3), **outcome)
            self._publish_outbox()
            return Verdict("ack", "", "card_done")

        def label(exc: PermanentJobError) -> str:
            return (
                "unsupported"
                if isinstance(exc, UnsupportedCardJob)
                else "unknown_card_input"
                if isinstance(exc, UnknownCardInput)
                else "product"
            )

        def release() -> None:
            self.current_card_input = None

        return self._verdicts(
            job,
            _JobSteps(
                claim=claim,
                start=start,
                run=lambda conn, claimed: self._through_store_outages(
                    conn, claimed, self.card_jobs.run, self.card_jobs.note, claimed.location
                ),
                done=done,
                label=label,
                record=lambda conn, reason, permanent, gen: self.card_jobs.fail(
                    conn, msg.card_input_id, reason, permanent, gen
                ),
                release=release,
            ),
        )

    def _verdicts(self, job: Delivery, steps: _JobSteps[Any]) -> Verdict:
        """One job, claimed, run and answered, the same for every job kind: a finished claim is a
        duplicate (ack), a live lease is waited for, a database or object store that cannot be
        reached is retried in place (the message and the lease kept: no delivery is used up), a
        permanent error is dead-lettered with the reason recorded, anything else is requeued with
        backoff up to the delivery limit."""
        db_attempt = 0
        generation: int | None = None
        while True:
            conn: psycopg2.extensions.connection | None = None
            try:
                conn = db.connect(self.dsn)
                claimed = steps.claim(conn)
                if claimed is None:
                    log.info("job.duplicate")
                    return Verdict("ack", "", "duplicate")
                work, generation = claimed
                steps.start(conn, work)
                started, started_cpu = time.monotonic(), time.process_time()
                outcome = steps.run(conn, work)
                if outcome is None:
                    return Verdict("requeue", "stopping while the object store is unavailable", "stopping")
                return steps.done(outcome, time.monotonic() - started, time.process_time() - started_cpu)
            except SceneChanged as exc:
                # Our rows were rolled back; the work is claimable again at its new generation.
                log.warning("job.scene_changed", reason=str(exc))
            except LeaseHeld as exc:
                wait_s = min(max(exc.remaining_s, 1.0), self.settings.lease_s) + 1.0
                if isinstance(exc, LeaseLost):
                    log.warning("job.lease_lost", wait_s=round(wait_s, 1))
                else:
                    log.info("job.lease_held", wait_s=round(wait_s, 1))
                if self.stopping.wait(min(wait_s, 30.0)):
                    return Verdict("requeue", "stopping while waiting for a lease", "stopping")
            except PermanentJobError as exc:
                label = steps.label(exc)
                log.error("job.failed_permanent", reason=str(exc)[:500], category=label)
                self._record_failure(conn, steps, str(exc), True, generation)
                return Verdict("dead_letter", str(exc), label)
            except psycopg2.Error as exc:
                if not db_unavailable(exc, conn):
                    return self._transient(job, conn, exc, "database", steps, generation)
                # Nothing wrong with the job: keep the message (no delivery is used up) and retry.
                self._note_db(reachable=False)
                db_attempt += 1
                delay_s = backoff_s(db_attempt, self.settings.backoff_max_s)
                log.warning(
                    "job.database_unavailable",
                    error=str(exc).strip()[:300],
                    attempt=db_attempt,
                    retry_in_s=round(delay_s, 1),
                )
                if self.stopping.wait(delay_s):
                    return Verdict("requeue", "stopping while the database is unavailable", "stopping")
            except OSError as exc:
                return self._transient(job, conn, exc, "io", steps, generation)
            except Exception as exc:  # noqa: BLE001 - an unknown error must not kill the consumer
                log.exception("job.failed_unexpected")
                return self._transient(job, conn, exc, "unexpected", steps, generation)
            finally:
                steps.release()
                if conn is not None:
                    self._mark_idle(conn)
                    conn.close()

    def _publish_outbox(self) -> None:
        """Publish the extraction jobs a CARD job just committed, so they need not wait for the
        watcher's next cycle. Best effort: a broker user without the right to publish jobs (the
        least-privilege worker role) or an outage leaves them pending for the watcher's flush."""
        try:
            flush_outbox(self.dsn, self.bus)
        except Exception as exc:  # noqa: BLE001 - the job is done; the watcher publishes what is left
            log.warning("job.outbox_deferred", error=str(exc).strip()[:300] or type(exc).__name__)

    def _through_store_outages(
        self,
        conn: psycopg2.extensions.connection,
        work: W,
        run: Callable[[psycopg2.extensions.connection, W], dict[str, Any]],
        note: Callable[[psycopg2.extensions.connection, W, str], None],
        location: str,
    ) -> dict[str, Any] | None:
        """Run the job, retrying in place while an object store cannot be reached.

        An unreachable store is infrastructure, like an unreachable database: the message is kept
        (no delivery is used up, so an outage can never dead-letter the backlog) and the lease stays
        ours (the current scene or card input stays set, the heartbeat renews it). The wait shows on
        the work (its ``reason``). None when a stop was requested meanwhile.
        """
        attempt = 0
        while True:
            try:
                return run(conn, work)
            except store.StoreUnavailable as exc:
                attempt += 1
                delay_s = backoff_s(attempt, self.settings.backoff_max_s)
                log.warning(
                    "job.store_unavailable", error=str(exc).strip()[:300], attempt=attempt, retry_in_s=round(delay_s, 1)
                )
                note(conn, work, f"object store unavailable, retrying in place (attempt {attempt}): {exc}")
                if self.stopping.wait(delay_s):
                    return None
                # GDAL remembers the outage's failures as missing files; the retry must ask again.
                store.forget_cached(location)

    def _mark_idle(self, conn: psycopg2.extensions.connection) -> None:
        if conn.closed:
            return
        try:
            self._mark(conn, "idle", None)
        except psycopg2.Error:
            pass  # the heartbeat corrects the registry

    def _transient(
        self,
        job: Delivery,
        conn: psycopg2.extensions.connection | None,
        exc: Exception,
        label: str,
        steps: _JobSteps[Any],
        generation: int | None = None,
    ) -> Verdict:
        """Requeue after a backoff that grows with the delivery count; on the last delivery the
        broker allows, mark the work failed first, since the broker is about to dead-letter it."""
        reason = f"{label}: {type(exc).__name__}: {exc}".strip()
        if job.delivery_count >= self.bus.delivery_limit:
            reason = f"gave up after {job.delivery_count + 1} deliveries (delivery limit {self.bus.delivery_limit}): "
            reason += f"{label}: {type(exc).__name__}: {exc}".strip()
            log.error("job.failed_delivery_limit", reason=reason[:500])
            self._record_failure(conn, steps, reason, True, generation)
            return Verdict("requeue", reason, "delivery_limit")
        delay_s = backoff_s(job.delivery_count + 1, self.settings.backoff_max_s)
        log.warning("job.failed_transient", reason=reason[:500], retry_in_s=round(delay_s, 1))
        self._record_failure(conn, steps, reason, False, generation)
        self.stopping.wait(delay_s)
        return Verdict("requeue", reason, label)

    def _record_failure(
        self,
        conn: psycopg2.extensions.connection | None,
        steps: _JobSteps[Any],
        reason: str,
        permanent: bool,
        generation: int | None,
    ) -> None:
        """The reason on the scene or card input, on a fresh connection when the job's is gone; a
        database that cannot take it is logged, never raised (the verdict must reach the broker)."""
        fresh = conn is None or bool(conn.closed)
        try:
            if fresh:
                conn = db.connect(self.dsn)
            assert conn is not None
            try:
                steps.record(conn, reason, permanent, generation)
            finally:
                if fresh:
                    conn.close()
        except psycopg2.Error as exc:
            log.warning("job.fail_record_failed", error=str(exc).strip()[:300])

    # ---- AMQP plumbing (connection thread) -------------------------------------------------
    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        assert self._conn is not None
        headers = properties.headers or {}
        self._pending.append(
            Delivery(
                channel=channel,
                connection=self._conn,
                tag=int(method.delivery_tag),
                body=body,
                message_id=properties.message_id,
                delivery_count=int(headers.get("x-delivery-count", 0) or 0),
            )
        )
        self._start_next()

    def _start_next(self) -> None:
        """Start the next delivery's job unless one is running (one job per process, always)."""
        if self._job is not None or not self._pending or self.stopping.is_set():
            return
        job = self._pending.popleft()
        self._job = job
        self.busy.set()
        self.metrics.busy.set(1)
        threading.Thread(target=self._job_main, args=(job,), name=f"job-{job.tag}", daemon=True).start()

    def _settle_finished(self) -> None:
        """Hand a finished job's verdict to the broker. Runs on the connection thread only, from the
        job's wake-up callback or the loop's poll, whichever comes first (the second finds nothing)."""
        job = self._job
        if job is None or not job.finished.is_set():
            return
        self._job = None
        verdict = job.verdict or Verdict("requeue", "no verdict", "unexpected")
        settled = False
        if job.channel.is_open:
            try:
                if verdict.action == "ack":
                    job.channel.basic_ack(job.tag)
                elif verdict.action == "requeue":
                    job.channel.basic_reject(job.tag, requeue=True)
                else:
                    job.channel.basic_reject(job.tag, requeue=False)
                settled = True
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("job.settle_failed", action=verdict.action, error=str(exc) or type(exc).__name__)
        if not settled:
            # The broker requeued the message when the channel died; its redelivery finds the scene
            # finished (acked as a duplicate) or claimable again.
            self.metrics.settles_lost.inc()
            log.warning("job.settle_lost", action=verdict.action, job_id=job.message_id)
        if verdict.action == "ack":
            self.metrics.jobs_done.labels(verdict.label).inc()
            self.metrics.job_duration.labels(verdict.label).observe(job.duration_s)
        else:
            self.metrics.jobs_failed.labels(verdict.label or "unexpected", verdict.action).inc()
            self.metrics.job_duration.labels("failed").observe(job.duration_s)
        self.done += 1
        self._last_job_end = time.monotonic()
        self.busy.clear()
        self.metrics.busy.set(0)
        if self.max_jobs and self.done >= self.max_jobs:
            self.request_stop()

    def _requeue_pending(self, channel: Any) -> None:
        """Deliveries received but never started (prefetch > 1, or one in flight at the cancel)."""
        while self._pending:
            job = self._pending.popleft()
            if channel.is_open:
                channel.basic_reject(job.tag, requeue=True)

    def _consume_once(self) -> None:
        assert self._job is None, "a job thread outlived its connection"
        conn = busmod.connect(self.bus)
        self._conn = conn
        channel = conn.channel()
        channel.basic_qos(prefetch_count=self.settings.prefetch)
        busmod.declare_topology(channel, self.bus)
        # consume() rather than basic_consume(): when the broker closes the channel (consumer_timeout,
        # or a late ack of an expired delivery) its generator raises ChannelClosedByBroker, with the
        # broker's reason, in our own context; basic_consume's callbacks would leave only is_closed.
        # A worker of several job kinds consumes the first queue so and the others with callbacks
        # (pika allows one generator per channel); those are paused while a job runs (see _pause).
        primary, *others = self.queues()
        deliveries = channel.consume(primary, auto_ack=False, inactivity_timeout=0.5)
        self._secondary = {q: "" for q in others}
        self._secondary_cancelled = False
        if others:
            channel.add_on_cancel_callback(self._on_broker_cancel)
            self._pause(channel, paused=False)
        self._reconnect_attempt = 0
        self._broker_down_since = None
        self._registry("idle")
        if others:
            log.info("worker.consuming", queue=primary, queues=[primary, *others], metrics_port=self.metrics_port)
        else:
            log.info("worker.consuming", queue=primary, metrics_port=self.metrics_port)
        cancelled = False
        while True:
            if cancelled:
                conn.process_data_events(time_limit=0.5)
                if channel.is_closed:
                    log.warning("worker.channel_closed", reason="closed while draining")
                    raise pika.exceptions.ChannelClosed(0, "channel closed while draining")
            else:
                try:
                    method, properties, body = next(deliveries)
                except pika.exceptions.ChannelClosed as exc:
                    log.warning("worker.channel_closed", reason=str(exc))
                    raise
                except StopIteration:
                    log.warning("worker.channel_closed", reason="consumer cancelled by the broker")
                    raise pika.exceptions.ChannelClosed(0, "consumer cancelled by the broker") from None
                if method is not None:
                    self._on_message(channel, method, properties, body or b"")
                if self._secondary_cancelled:
                    log.warning("worker.channel_closed", reason="consumer cancelled by the broker")
                    raise pika.exceptions.ChannelClosed(0, "consumer cancelled by the broker")
            self._settle_finished()
            self._start_next()
            if self._secondary and not cancelled:
                self._pause(channel, paused=self._job is not None or bool(self._pending))
            if self._drain_file_present() and not self.stopping.is_set():
                log.info("worker.drain_requested", source="file")
                self.request_stop()
            idle = self._job is None and not self._pending
            if self.settings.idle_exit_s and idle and time.monotonic() - self._last_job_end > self.settings.idle_exit_s:
                log.info("worker.idle_exit", idle_s=self.settings.idle_exit_s)
                self.request_stop()
            if self.stopping.is_set():
                if not cancelled:
                    channel.cancel()  # deliveries the generator still holds go back to the queue
                    self._pause(channel, paused=True)
                    cancelled = True
                    self._registry("draining")
                self._requeue_pending(channel)
                if self._job is None:
                    break
                if self._past_stop_deadline():
                    log.warning("worker.stop_deadline_passed", scene_id=self.current_scene)
                    break  # closing the connection requeues the unacked message
        conn.close()

    def queues(self) -> list[str]:
        """The queues of ``settings.job_kinds``, the CARD queue first: with prefetch 1 per consumer
        (quorum queues have no channel-wide prefetch), the first queue's consumer is the one that can
        still deliver while a job runs, and a CARD job waiting seconds behind an extraction is cheaper
        than an extraction waiting minutes behind a CARD job."""
        kinds = sorted(set(self.settings.job_kinds), key=lambda k: (k != "GenerateCard", k))
        unknown = [k for k in kinds if k not in JOB_KINDS]
        if unknown or not kinds:
            raise ConfigError(
                f"CBMFLOW_WORKER_JOB_KINDS: unknown job kind(s) {unknown} (known: {', '.join(JOB_KINDS)})"
            )
        return list(dict.fromkeys(self.bus.queue_for(k) for k in kinds))

    def _pause(self, channel: Any, *, paused: bool) -> None:
        """Cancel the secondary consumers while a job runs (or waits), consume again once idle, so a
        worker of several kinds holds at most one message besides its job."""
        for queue, tag in self._secondary.items():
            if paused and tag:
                channel.basic_cancel(tag)
                self._secondary[queue] = ""
            elif not paused and not tag:
                self._secondary[queue] = channel.basic_consume(queue, self._on_message, auto_ack=False)

    def _on_broker_cancel(self, _method: Any) -> None:
        """The broker cancelled a consumer (its queue deleted): reconnect, as the generator's end does."""
        self._secondary_cancelled = True

    def _close_quietly(self) -> None:
        conn = self._conn
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as exc:  # noqa: BLE001 - already broken; closing is best effort
                log.debug("worker.close_failed", error=str(exc))

    def _wait_out_job(self) -> None:
        """Never consume again while a job from the lost connection still runs: wait for it (its
        lease is renewed meanwhile), unless a stop request's deadline passes first."""
        job = self._job
        if job is None:
            return
        log.warning("worker.connection_lost_midjob", scene_id=self.current_scene, job_id=job.message_id)
        while not job.finished.wait(0.5):
            self._give_up_if_unreachable()  # a job retrying a gone database returns once stopping
            if self._past_stop_deadline():
                log.warning("worker.stop_deadline_passed", scene_id=self.current_scene)
                return
        self._settle_finished()  # the channel is gone: counted as a lost settle

    def run(self) -> int:
        structlog.contextvars.bind_contextvars(worker_id=self.me)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._signal)
            signal.signal(signal.SIGINT, self._signal)
        self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        self._registry("starting")
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        threading.Thread(target=self._dead_letter_loop, name="dead-letters", daemon=True).start()
        self._last_job_end = time.monotonic()
        while not self.stopping.is_set():
            try:
                self._consume_once()
            except busmod.BROKER_ERRORS as exc:
                if self._broker_down_since is None:
                    self._broker_down_since = time.monotonic()
                self.metrics.reconnects.inc()
                self._close_quietly()
                self._pending.clear()  # their messages went back to the queue with the connection
                self._wait_out_job()
                if self._job is not None:
                    break  # stop deadline passed with the job still running
                self._probe_db()
                if self._give_up_if_unreachable():
                    break
                self._reconnect_attempt += 1
                delay_s = self._retry_in_s(backoff_s(self._reconnect_attempt, self.settings.backoff_max_s))
                log.warning(
                    "worker.reconnect",
                    error=str(exc) or type(exc).__name__,
                    in_s=round(delay_s, 1),
                    database_reachable=self._db_down_since is None,
                    unreachable_s=round(self._unreachable_s(), 1),
                )
                self.stopping.wait(delay_s)
        if self._job is not None:
            log.warning("worker.exit_with_job", scene_id=self.current_scene, job_id=self._job.message_id)
        self.exited.set()
        heartbeat.join(timeout=15)  # its last update must not land after "stopped"
        self.current_scene = None
        self._registry("stopped")
        log.info("worker.stopped", jobs=self.done, exit_code=EXIT_UNREACHABLE if self.gave_up else 0)
        return EXIT_UNREACHABLE if self.gave_up else 0
