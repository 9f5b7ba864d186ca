"""The job consumer: claim, extract, acknowledge, with heartbeats that never starve.

pika's BlockingConnection is not thread-safe, so the job runs in a thread of its own and hands its
verdict back to the connection's thread through ``add_callback_threadsafe``; the connection thread
keeps calling ``process_data_events`` so broker heartbeats are answered during long jobs.

Verdicts: ``ack`` (done, or a duplicate of a finished scene), ``requeue`` (transient failure,
after a backoff) and ``dead_letter`` (permanent failure: ``basic_reject(requeue=False)`` goes
straight to the dead-letter exchange, with the reason recorded on the scene).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pika
import pika.exceptions
import psycopg2
import psycopg2.extensions

from cbmflow import bus as busmod
from cbmflow import db
from cbmflow.errors import PermanentJobError
from cbmflow.logging import get_logger
from cbmflow.messages import ExtractParcels, parse_message
from cbmflow.settings import BusSettings, DbSettings, WorkerSettings
from worker.scene import ClaimedScene, IndexCache, extract_s2

log = get_logger("worker")


@dataclass
class Verdict:
    action: str  # "ack" | "requeue" | "dead_letter"
    reason: str = ""


class LeaseHeld(Exception):
    """Another live worker holds the scene's lease; wait for it to finish or expire."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(f"lease held for another {remaining_s:.0f} s")
        self.remaining_s = remaining_s


def worker_id() -> str:
    return os.environ.get("CBMFLOW_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


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
        over; one with a live lease raises :class:`LeaseHeld`.
        """
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET status = 'processing', lease_owner = %(me)s,"
                "       lease_until = now() + make_interval(secs => %(lease)s), attempts = attempts + 1,"
                "       updated_at = now(), reason = NULL"
                " WHERE id = %(id)s AND (status IN ('discovered', 'queued', 'failed')"
                "       OR (status = 'processing' AND (lease_until < now() OR lease_owner = %(me)s)))"
                " RETURNING product_id, card, location, extract(year FROM acquired_at AT TIME ZONE 'UTC')::int",
                {"me": self.me, "lease": self.settings.lease_s, "id": msg.scene_id},
            )
            row = cur.fetchone()
            if row is not None:
                return ClaimedScene(id=msg.scene_id, product_id=row[0], card=row[1], location=row[2], year=row[3])
            cur.execute(
                "SELECT status, extract(epoch FROM lease_until - now()) FROM scenes WHERE id = %s", (msg.scene_id,)
            )
            found = cur.fetchone()
        if found is None:
            raise PermanentJobError(f"unknown scene {msg.scene_id}")
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
        """Extract and mark the scene done in ONE transaction, guarded by our lease."""
        with conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM scenes WHERE id = %s AND lease_owner = %s FOR UPDATE", (scene.id, self.me))
            if cur.fetchone() is None:
                raise LeaseHeld(0.0)
            if scene.card != "s2":
                raise PermanentJobError(f"card {scene.card!r} is not supported by this worker yet")
            result = extract_s2(cur, scene, self.cache)
            status = "extracted" if result.sig_rows or result.hist_rows else "no_parcels"
            cur.execute(
                "UPDATE scenes SET status = %s, rows_written = %s, lease_owner = NULL, lease_until = NULL,"
                " updated_at = now() WHERE id = %s",
                (status, result.sig_rows + result.hist_rows, scene.id),
            )
        return {"status": status, "datasets": result.datasets, "parcels": result.parcels,
                "sig_rows": result.sig_rows, "hist_rows": result.hist_rows}  # fmt: skip

    def fail(self, conn: psycopg2.extensions.connection, scene_id: int, reason: str, permanent: bool) -> None:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE scenes SET status = %s, reason = %s, lease_owner = NULL, lease_until = NULL,"
                " updated_at = now() WHERE id = %s AND (lease_owner = %s OR lease_owner IS NULL)",
                ("failed" if permanent else "queued", reason[:2000], scene_id, self.me),
            )


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
        self.max_jobs = max_jobs
        self.done = 0
        self.stopping = threading.Event()
        self.busy = threading.Event()
        self.current_scene: int | None = None
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._consumer_tag: str | None = None
        self._last_job_end = time.monotonic()

    # ---- registry -------------------------------------------------------------------------
    def _registry(self, state: str) -> None:
        try:
            with db.transaction(self.dsn) as cur:
                cur.execute(
                    "INSERT INTO workers (id, host, pid, state, current_scene) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, current_scene = EXCLUDED.current_scene,"
                    " heartbeat_at = now(), pid = EXCLUDED.pid, host = EXCLUDED.host",
                    (self.me, socket.gethostname(), os.getpid(), state, self.current_scene),
                )
        except psycopg2.Error as exc:
            log.warning("worker.registry_failed", error=str(exc))

    def _heartbeat_loop(self) -> None:
        """Keep the registry row fresh, renew the current lease, and notice a drain request."""
        conn: psycopg2.extensions.connection | None = None
        while not self.stopping.wait(self.settings.heartbeat_s):
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.dsn)
                with conn, conn.cursor() as cur:
                    state = "busy" if self.busy.is_set() else "idle"
                    cur.execute(
                        "UPDATE workers SET heartbeat_at = now(),"
                        " state = CASE WHEN state = 'draining' THEN state ELSE %s END, current_scene = %s"
                        " WHERE id = %s RETURNING state",
                        (state, self.current_scene, self.me),
                    )
                    row = cur.fetchone()
                if row is not None and row[0] == "draining":
                    log.info("worker.drain_requested", source="registry")
                    self.request_stop()
                if self.current_scene is not None:
                    self.jobs.renew(conn, self.current_scene)
            except psycopg2.Error as exc:
                log.warning("worker.heartbeat_failed", error=str(exc))
                conn = None
        if conn is not None:
            conn.close()

    # ---- control --------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self.stopping.set()

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("worker.signal", signal=signal.Signals(signum).name)
        self.request_stop()

    def _drain_file_present(self) -> bool:
        return bool(self.settings.drain_file) and Path(self.settings.drain_file).exists()

    # ---- the job --------------------------------------------------------------------------
    def _handle(self, body: bytes) -> Verdict:
        try:
            msg = parse_message(body)
        except PermanentJobError as exc:
            log.error("job.malformed", error=str(exc)[:500])
            return Verdict("dead_letter", str(exc))
        if not isinstance(msg, ExtractParcels):
            return Verdict("dead_letter", f"unexpected message kind {msg.kind}")
        bound = log.bind(scene_id=msg.scene_id, product_id=msg.product_id)
        attempt = 0
        while True:
            conn: psycopg2.extensions.connection | None = None
            try:
                conn = db.connect(self.dsn)
                scene = self.jobs.claim(conn, msg)
                if scene is None:
                    bound.info("job.duplicate")
                    return Verdict("ack")
                self.current_scene = scene.id
                started = time.monotonic()
                outcome = self.jobs.run(conn, scene)
                bound.info("job.done", duration_s=round(time.monotonic() - started, 3), **outcome)
                return Verdict("ack")
            except LeaseHeld as exc:
                wait_s = min(max(exc.remaining_s, 1.0), self.settings.lease_s) + 1.0
                bound.info("job.lease_held", wait_s=round(wait_s, 1))
                if self.stopping.wait(min(wait_s, 30.0)):
                    return Verdict("requeue", "stopping while waiting for a lease")
            except PermanentJobError as exc:
                bound.error("job.failed_permanent", reason=str(exc)[:500])
                self._fail(conn, msg.scene_id, str(exc), permanent=True)
                return Verdict("dead_letter", str(exc))
            except (psycopg2.OperationalError, psycopg2.InterfaceError, OSError) as exc:
                attempt += 1
                delay_s = min(2.0**attempt, 30.0)
                bound.warning("job.failed_transient", error=str(exc)[:500], retry_in_s=delay_s)
                self._fail(conn, msg.scene_id, str(exc), permanent=False)
                time.sleep(delay_s)
                return Verdict("requeue", str(exc))
            except Exception as exc:  # noqa: BLE001 - an unknown error must not kill the consumer
                bound.exception("job.failed_unexpected")
                self._fail(conn, msg.scene_id, f"{type(exc).__name__}: {exc}", permanent=False)
                time.sleep(2.0)
                return Verdict("requeue", str(exc))
            finally:
                self.current_scene = None
                if conn is not None:
                    conn.close()

    def _fail(self, conn: psycopg2.extensions.connection | None, scene_id: int, reason: str, permanent: bool) -> None:
        try:
            if conn is None or conn.closed:
                conn = db.connect(self.dsn)
            self.jobs.fail(conn, scene_id, reason, permanent)
        except psycopg2.Error as exc:
            log.warning("job.fail_record_failed", error=str(exc)[:300])

    # ---- AMQP plumbing --------------------------------------------------------------------
    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.busy.set()
        conn = self._conn
        assert conn is not None

        def work() -> None:
            verdict = self._handle(body)
            try:
                conn.add_callback_threadsafe(lambda: self._settle(channel, method.delivery_tag, verdict))
            except Exception as exc:  # noqa: BLE001 - the connection died under the job
                # The broker requeues the unacked message; its redelivery is acked as a duplicate.
                log.warning("job.settle_lost", action=verdict.action, error=str(exc) or type(exc).__name__)
                self.busy.clear()

        threading.Thread(target=work, name="job", daemon=True).start()

    def _settle(self, channel: Any, tag: int, verdict: Verdict) -> None:
        try:
            if verdict.action == "ack":
                channel.basic_ack(tag)
            elif verdict.action == "requeue":
                channel.basic_reject(tag, requeue=True)
            else:
                channel.basic_reject(tag, requeue=False)
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.AMQPError) as exc:
            # The broker closed the channel (e.g. consumer_timeout) and requeued the message itself;
            # the redelivery finds the scene finished and is acked as a duplicate.
            log.warning("job.settle_failed", action=verdict.action, error=str(exc))
        self.done += 1
        self._last_job_end = time.monotonic()
        self.busy.clear()
        if self.max_jobs and self.done >= self.max_jobs:
            self.request_stop()

    def _consume_once(self) -> None:
        self._conn = busmod.connect(self.bus)
        channel = self._conn.channel()
        self._channel = channel
        channel.basic_qos(prefetch_count=self.settings.prefetch)
        busmod.declare_topology(channel, self.bus)
        self._consumer_tag = channel.basic_consume(self.bus.queue, self._on_message, auto_ack=False)
        self._registry("idle")
        log.info("worker.consuming", queue=self.bus.queue, worker_id=self.me)
        cancelled = False
        deadline: float | None = None
        while True:
            self._conn.process_data_events(time_limit=0.5)
            if channel.is_closed:
                # pika does not raise when the broker closes the channel (consumer_timeout).
                raise pika.exceptions.ChannelClosed(0, "channel closed by broker")
            if self._drain_file_present():
                log.info("worker.drain_requested", source="file")
                self.request_stop()
            if self.settings.idle_exit_s and not self.busy.is_set():
                if time.monotonic() - self._last_job_end > self.settings.idle_exit_s:
                    self.request_stop()
            if self.stopping.is_set():
                if not cancelled:
                    channel.basic_cancel(self._consumer_tag)
                    cancelled = True
                    deadline = time.monotonic() + self.settings.stop_deadline_s
                    self._registry("draining")
                if not self.busy.is_set():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("worker.stop_deadline_passed")
                    break  # closing the connection requeues the unacked message
        self._conn.close()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        self._registry("starting")
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        backoff_s = 1.0
        while not self.stopping.is_set():
            try:
                self._consume_once()
                backoff_s = 1.0
            except (pika.exceptions.AMQPError, OSError) as exc:
                if self.busy.is_set():
                    # the job thread still runs; its ack will fail and the broker redelivers
                    log.warning("worker.connection_lost_midjob", error=str(exc))
                log.warning("worker.reconnect", error=str(exc) or type(exc).__name__, in_s=backoff_s)
                if self._conn is not None and self._conn.is_open:
                    try:
                        self._conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                while self.busy.is_set():
                    time.sleep(0.2)  # never run two jobs at once across a reconnect
                self.stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 30.0)
        self.current_scene = None
        self._registry("stopped")
        log.info("worker.stopped", jobs=self.done)
        return 0
