"""RabbitMQ topology, confirmed publishing and queue depth.

One quorum queue carries the jobs; it has a delivery limit and a dead-letter exchange so a
message that keeps failing ends in a dead-letter queue instead of looping forever. Publishing
always uses publisher confirms: the outbox row is marked published only after the broker said
it has the message.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import requests
from pika.adapters.blocking_connection import BlockingChannel as Channel

from cbmflow.settings import BusSettings

BROKER_ERRORS: tuple[type[Exception], ...] = (pika.exceptions.AMQPError, OSError)
"""What a broker that is away or went away raises: pika's own errors, and the socket's before pika
wraps them (connection refused, reset). Callers retry, or report and exit, on exactly these."""


def connection_params(bus: BusSettings) -> pika.URLParameters:
    params = pika.URLParameters(bus.resolved_amqp_url())
    params.heartbeat = bus.heartbeat_s
    params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    return params


def connect(bus: BusSettings | None = None) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_params(bus or BusSettings()))


def declare_topology(channel: Channel, bus: BusSettings) -> None:
    """Idempotently declare the job queues, the dead-letter exchange and its queue.

    Both job queues (extraction, CARD generation) share one dead-letter queue: a letter keeps its
    ``type`` (the job kind), so ``jobs retry`` knows which queue it goes back to.
    """
    channel.exchange_declare(bus.dead_letter_exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(bus.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(bus.dead_letter_queue, bus.dead_letter_exchange)
    for queue in bus.job_queues:
        channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": bus.delivery_limit,
                "x-dead-letter-exchange": bus.dead_letter_exchange,
            },
        )


def publish(channel: Channel, bus: BusSettings, body: bytes, message_id: str, kind: str) -> None:
    """Publish one persistent message; raises if the broker does not confirm it.

    The channel must be in confirm mode (``channel.confirm_delivery()``); pika's blocking channel
    then raises ``UnroutableError``/``NackError`` instead of returning silently.
    """
    channel.basic_publish(
        exchange="",
        routing_key=bus.queue_for(kind),
        body=body,
        mandatory=True,
        properties=pika.BasicProperties(
            delivery_mode=2,
            message_id=message_id,
            content_type="application/json",
            type=kind,
        ),
    )


@dataclass(frozen=True)
class QueueDepth:
    ready: int
    unacked: int
    consumers: int
    dead_lettered: int

    @property
    def backlog(self) -> int:
        return self.ready + self.unacked


def _vhost(bus: BusSettings) -> str:
    path = urllib.parse.urlparse(bus.resolved_amqp_url()).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def management_get(bus: BusSettings, path: str, timeout_s: float = 10.0) -> Any:
    url = urllib.parse.urlparse(bus.resolved_management_url())
    base = f"{url.scheme}://{url.hostname}:{url.port}"
    auth = (urllib.parse.unquote(url.username or "guest"), urllib.parse.unquote(url.password or "guest"))
    resp = requests.get(base + path, auth=auth, timeout=timeout_s)
    resp.raise_for_status()
    return resp.json()


def queue_depth(bus: BusSettings | None = None, queue: str | None = None) -> QueueDepth:
    """Ready + unacked from the management API (the AMQP passive declare cannot see unacked).

    The management API samples every ~5 s, so a just-published message may read as 0 for a few
    seconds; callers tolerate that lag (the provisioner's control law is built for it).
    """
    bus = bus or BusSettings()
    vhost = urllib.parse.quote(_vhost(bus), safe="")
    cols = "?columns=messages_ready,messages_unacknowledged,consumers,messages"

    def one(name: str) -> dict[str, Any]:
        try:
            data: Any = management_get(bus, f"/api/queues/{vhost}/{urllib.parse.quote(name, safe='')}{cols}")
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                return {}
            raise
        # A queue not yet sampled by the management plugin answers ``[]`` for a columns query.
        return data if isinstance(data, dict) else {}

    q = one(queue or bus.queue)
    dl = one(bus.dead_letter_queue)
    return QueueDepth(
        ready=int(q.get("messages_ready", 0) or 0),
        unacked=int(q.get("messages_unacknowledged", 0) or 0),
        consumers=int(q.get("consumers", 0) or 0),
        dead_lettered=int(dl.get("messages", 0) or 0),
    )


@dataclass(frozen=True)
class DeadLetter:
    """A message taken from the dead-letter queue and not yet acknowledged."""

    tag: int
    body: bytes
    properties: pika.BasicProperties

    @property
    def death_reason(self) -> str:
        """Why the broker dead-lettered it: ``rejected`` (a permanent failure) or ``delivery_limit``."""
        headers = self.properties.headers or {}
        deaths = headers.get("x-death") or []
        if deaths and isinstance(deaths[0], dict):
            return str(deaths[0].get("reason", ""))
        return str(headers.get("x-first-death-reason", ""))


def fetch_dead_letters(channel: Channel, bus: BusSettings) -> list[DeadLetter]:
    """Take every message now in the dead-letter queue, unacknowledged (so a crash puts them back).

    Bounded by the count at the start, so letters arriving meanwhile cannot keep the loop going.
    """
    ok = channel.queue_declare(bus.dead_letter_queue, passive=True)
    letters: list[DeadLetter] = []
    for _ in range(int(ok.method.message_count)):
        method, properties, body = channel.basic_get(bus.dead_letter_queue, auto_ack=False)
        if method is None:
            break
        letters.append(DeadLetter(int(method.delivery_tag), bytes(body), properties))
    return letters


def keep_dead_letter(channel: Channel, bus: BusSettings, letter: DeadLetter) -> None:
    """Put a fetched letter back at the tail of the dead-letter queue, headers and all.

    Re-published and then acked rather than rejected with requeue: on RabbitMQ >= 4.0 every
    return counts against the quorum queue's default delivery limit (20), and the dead-letter
    queue has no dead-letter exchange of its own, so a letter returned that often would be dropped.
    The channel must be in confirm mode; a crash in between leaves a duplicate letter, never none.
    Sent through the dead-letter exchange (a fanout bound to that queue only), not the default
    exchange: the worker's broker user may write there and nowhere else (:func:`role_permissions`).
    """
    channel.basic_publish(
        exchange=bus.dead_letter_exchange,
        routing_key="",
        body=letter.body,
        mandatory=True,
        properties=letter.properties,
    )
    channel.basic_ack(letter.tag)


def passive_depth(channel: Channel, bus: BusSettings, queue: str | None = None) -> tuple[int, int]:
    """(ready, consumers) by passive declare: instant, unlike the sampled management figures."""
    ok = channel.queue_declare(queue or bus.queue, passive=True)
    return int(ok.method.message_count), int(ok.method.consumer_count)


# --- Broker users per role (least privilege) -------------------------------------------------------

BUS_ROLES = ("worker", "watcher")


def role_user_name(role: str) -> str:
    """The RabbitMQ user of a component: ``cbmflow-worker``, ``cbmflow-watcher``."""
    from cbmflow.errors import InvalidInputError

    if role not in BUS_ROLES:
        raise InvalidInputError(f"unknown broker role {role!r}: one of {', '.join(BUS_ROLES)}")
    return f"cbmflow-{role}"


def role_permissions(bus: BusSettings, role: str) -> dict[str, str]:
    """Configure/write/read regexes of a role's user on the vhost of ``bus``'s AMQP URL.

    Both declare the topology on start (``declare_topology``), which RabbitMQ checks as: configure
    on the three names; write on the dead-letter queue and read on the dead-letter exchange (the
    binding); read on the job queue and write on the dead-letter exchange (a queue declared with
    ``x-dead-letter-exchange``). So the watcher could also read jobs and either role could publish
    into the dead-letter exchange: the price of components declaring their own topology. The
    worker also reads the dead-letter queue and puts letters back through the dead-letter exchange
    (``worker.deadletters``: the fleet-wide reconciliation); it publishes nothing else, and rejected
    jobs are dead-lettered by the broker itself. The
    watcher publishes jobs through the default exchange, which RabbitMQ checks as ``amq.default``
    (the only way to reach the job queue or the dead-letter queue directly). Neither user gets a
    tag, so neither can log in to the management API.
    """
    import re

    role_user_name(role)
    q = "|".join(re.escape(n) for n in bus.job_queues)
    dlq, dlx = (re.escape(n) for n in (bus.dead_letter_queue, bus.dead_letter_exchange))
    configure = f"^({q}|{dlq}|{dlx})$"
    if role == "worker":
        return {"configure": configure, "write": f"^({dlq}|{dlx})$", "read": f"^({q}|{dlq}|{dlx})$"}
    return {"configure": configure, "write": f"^(amq\\.default|{dlq}|{dlx})$", "read": f"^({q}|{dlx})$"}


def _management_call(bus: BusSettings, method: str, path: str, body: Any, timeout_s: float = 10.0) -> None:
    url = urllib.parse.urlparse(bus.resolved_management_url())
    base = f"{url.scheme}://{url.hostname}:{url.port}"
    auth = (urllib.parse.unquote(url.username or "guest"), urllib.parse.unquote(url.password or "guest"))
    resp = requests.request(method, base + path, json=body, auth=auth, timeout=timeout_s)
    resp.raise_for_status()


def role_url(bus: BusSettings, role: str) -> str:
    """Create (or rotate the password of) the role's broker user, set its permissions on the
    vhost, and return its AMQP URL, the only copy of the password (the broker keeps a salted hash).

    Done through the management API with the operator's credentials (``CBMFLOW_BUS_MANAGEMENT_URL``).
    Rotating invalidates the previous URL for new connections.
    """
    import secrets

    user = role_user_name(role)
    password = secrets.token_urlsafe(24)
    vhost = urllib.parse.quote(_vhost(bus), safe="")
    quser = urllib.parse.quote(user, safe="")
    _management_call(bus, "PUT", f"/api/users/{quser}", {"password": password, "tags": ""})
    _management_call(bus, "PUT", f"/api/permissions/{vhost}/{quser}", role_permissions(bus, role))
    amqp = urllib.parse.urlparse(bus.resolved_amqp_url())
    host = amqp.hostname or "localhost"
    netloc = f"{quser}:{urllib.parse.quote(password, safe='')}@{'[' + host + ']' if ':' in host else host}"
    if amqp.port:
        netloc += f":{amqp.port}"
    return urllib.parse.urlunparse(amqp._replace(netloc=netloc))
