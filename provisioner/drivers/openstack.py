"""The OpenStack driver: worker VMs booted with cloud-init user-data, found again by tag.

Everything the provisioner needs to remember lives on the servers themselves, so any number of
``provision scale`` runs (a timer, a daemon, an operator) agree without a database of their own:

* every server carries the tags ``cbmflow-worker`` and ``cbmflow-pool-<pool>`` and is listed
  server-side by both (Nova's ``tags=`` filter needs all of them), so two pools in one project, or
  unrelated servers, are never touched;
* its name is the worker id (``CBMFLOW_WORKER_ID`` in its environment file), which joins it to
  its row in the ``workers`` registry;
* a drain is recorded in its metadata (``cbmflow-state=draining``, ``cbmflow-draining-since``),
  which survives a provisioner restart, and signalled to the worker through its registry row,
  which the worker polls anyway: no SSH and no inbound port are needed to scale.

Quota errors (Nova answers 403), timeouts and other API errors end the current boot wave with a
log line instead of an exception: the next control step sees the fleet as it really is (a server
whose POST timed out may exist after all and is then found by its tag) and tries again.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from cbmflow.errors import CbmflowError, ConfigError
from cbmflow.logging import get_logger
from cbmflow.settings import ProvisionSettings
from provisioner import registry
from provisioner.drivers import refuse_orphans_start
from provisioner.policy import WorkerView
from provisioner.userdata import nova_user_data

log = get_logger("provisioner")

TAG = "cbmflow-worker"
META_POOL = "cbmflow-pool"
POOL_TAG_PREFIX = "cbmflow-pool-"
META_STATE = "cbmflow-state"
META_DRAINING_SINCE = "cbmflow-draining-since"
GONE_STATUSES = frozenset({"DELETED", "SOFT_DELETED"})
# Nova tags: at most 60 characters, no comma or slash; server names become host names.
_POOL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def pool_tag(pool: str) -> str:
    if not _POOL_RE.match(pool):
        raise ConfigError(
            f"CBMFLOW_PROVISION_POOL {pool!r}: use 1-40 lowercase letters, digits and '-' "
            "(it becomes a tag and a host name)"
        )
    return f"{POOL_TAG_PREFIX}{pool}"


def server_pool(server: Any) -> str:
    """The pool a server was booted for: its metadata, else its pool tag (metadata can be edited
    by hand, the tag set at boot is what the listing filters on, so the tag wins when both exist)."""
    for tag in server.tags or ():
        if str(tag).startswith(POOL_TAG_PREFIX):
            return str(tag)[len(POOL_TAG_PREFIX) :]
    return str((server.metadata or {}).get(META_POOL, ""))


def _epoch(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _address(addresses: dict[str, Any] | None, access_ipv4: str | None) -> str:
    """The address operators reach a worker on: the floating IP if any, else the first fixed IPv4."""
    if access_ipv4:
        return access_ipv4
    fixed = ""
    for entries in (addresses or {}).values():
        for entry in entries or []:
            if entry.get("version") != 4:
                continue
            if entry.get("OS-EXT-IPS:type") == "floating":
                return str(entry.get("addr", ""))
            fixed = fixed or str(entry.get("addr", ""))
    return fixed


def _cloud_errors() -> tuple[type[BaseException], ...]:
    """Every error an API call may raise: the SDK's own and keystoneauth's (timeouts, connection)."""
    import keystoneauth1.exceptions
    import openstack.exceptions

    return (openstack.exceptions.SDKException, keystoneauth1.exceptions.ClientException)


class OpenStackDriver:
    def __init__(
        self,
        settings: ProvisionSettings,
        *,
        userdata: Callable[[str], str],
        dsn: str | None,
        connection: Any | None = None,
        clock: Callable[[], float] = time.time,
        orphans_of: Sequence[str] | None = None,
    ) -> None:
        """``userdata(name)`` renders the user-data of the server called ``name`` (its worker id).

        ``orphans_of`` (the configured pool names) turns the driver to the workers of every *other*
        pool: those left behind when a pool is renamed or removed, which no pool's step would ever
        see, drain or delete again."""
        self.settings = settings
        self.pool_tag = pool_tag(settings.pool)
        self.orphans_of = None if orphans_of is None else frozenset(orphans_of)
        self._userdata = userdata
        self.dsn = dsn
        self._conn = connection
        self._clock = clock
        self._flavor: Any = None
        self._placement: tuple[Any, str, str] | None = None
        self._ids: dict[str, str] = {}  # server name -> server id, from the last listing

    # ---- connection and lookups --------------------------------------------------------------
    @property
    def conn(self) -> Any:
        if self._conn is None:
            import openstack
            import openstack.exceptions

            try:
                self._conn = openstack.connect(
                    cloud=self.settings.cloud or None, api_timeout=self.settings.api_timeout_s
                )
            except openstack.exceptions.ConfigException as exc:
                raise ConfigError(
                    f"OpenStack configuration: {exc} (set CBMFLOW_PROVISION_CLOUD or OS_CLOUD to a clouds.yaml entry)"
                ) from exc
        return self._conn

    def _require(self) -> None:
        missing = [n for n in ("image", "flavor", "network") if not getattr(self.settings, n)]
        if missing:
            names = ", ".join(f"CBMFLOW_PROVISION_{n.upper()}" for n in missing)
            raise ConfigError(f"the openstack driver needs {names} to boot workers")

    def _resolve(self) -> tuple[Any, str, str]:
        """(flavor, image id, network id), looked up once per driver: names are stable, ids even more."""
        self._require()
        if self._placement is None:
            try:
                flavor = self._flavor or self.conn.compute.find_flavor(self.settings.flavor, ignore_missing=False)
                image = self.conn.image.find_image(self.settings.image, ignore_missing=False)
                network = self.conn.network.find_network(self.settings.network, ignore_missing=False)
            except _cloud_errors() as exc:
                raise ConfigError(f"cannot resolve image/flavor/network: {exc}") from exc
            self._flavor = flavor
            self._placement = (flavor, str(image.id), str(network.id))
        return self._placement

    # ---- the driver port ---------------------------------------------------------------------
    def list_workers(self) -> list[WorkerView]:
        tags = TAG if self.orphans_of is not None else f"{TAG},{self.pool_tag}"
        try:
            servers = [
                s
                for s in self.conn.compute.servers(details=True, tags=tags)
                if str(s.status or "").upper() not in GONE_STATUSES
                and (self.orphans_of is None or server_pool(s) not in self.orphans_of)
            ]
        except _cloud_errors() as exc:
            raise CbmflowError(f"cannot list worker servers: {exc}") from exc
        self._ids = {str(s.name): str(s.id) for s in servers}
        rows = registry.read(self.dsn, sorted(self._ids))
        views = []
        redrain = []
        for s in servers:
            name = str(s.name)
            meta = dict(s.metadata or {})
            row = rows.get(name) if rows is not None else None
            draining = meta.get(META_STATE) == "draining"
            since = meta.get(META_DRAINING_SINCE)
            if row is not None and row.state == "stopped":
                state = "stopped"
            elif draining:
                state = "draining"
                if row is not None and row.state != "draining":
                    # The request never reached the row (database away at drain time, row recreated): ask again.
                    redrain.append(name)
            elif rows is None:
                state = "unknown"
            elif row is not None:
                state = row.state
            else:
                state = "starting"
            views.append(
                WorkerView(
                    id=name,
                    state=state,
                    started_at_s=_epoch(s.created_at),
                    current_scene=row.current_scene if row else None,
                    heartbeat_age_s=row.heartbeat_age_s if row else None,
                    detail=str(s.flavor.get("original_name", "")) if isinstance(s.flavor, dict) else "",
                    registered=None if rows is None else row is not None,
                    server_status=str(s.status or ""),
                    draining_since_s=float(since) if since else None,
                    server_id=str(s.id),
                    address=_address(s.addresses, s.access_ipv4),
                    pool=server_pool(s),
                )
            )
        if redrain:
            registry.request_drain(self.dsn, redrain)
        return views

    def start(self, n: int) -> list[str]:
        if n <= 0:
            return []
        if self.orphans_of is not None:
            refuse_orphans_start()
        flavor, image_id, network_id = self._resolve()
        started: list[str] = []
        import openstack.exceptions

        for _ in range(n):
            name = f"cbmflow-{self.settings.pool}-{secrets.token_hex(4)}"
            kwargs: dict[str, Any] = {
                "name": name,
                "flavor_id": str(flavor.id),
                "image_id": image_id,
                "networks": [{"uuid": network_id}],
                "user_data": nova_user_data(self._userdata(name)),
                "tags": [TAG, self.pool_tag],
                "metadata": {META_POOL: self.settings.pool, META_STATE: "active"},
            }
            if self.settings.key_name:
                kwargs["key_name"] = self.settings.key_name
            if self.settings.security_groups:
                kwargs["security_groups"] = [{"name": g} for g in self.settings.security_groups]
            try:
                server = self.conn.compute.create_server(**kwargs)
            except openstack.exceptions.ForbiddenException as exc:
                log.warning("provision.quota_exceeded", name=name, started=len(started), wanted=n, error=str(exc)[:300])
                break
            except _cloud_errors() as exc:
                # A timed-out POST may still have created the server; the next listing finds it by tag.
                log.error("provision.boot_failed", name=name, error=f"{type(exc).__name__}: {exc}"[:300])
                break
            self._ids[name] = str(server.id)
            log.info("provision.started", worker_id=name, server_id=str(server.id))
            started.append(name)
        return started

    def _server_id(self, name: str) -> str | None:
        if name not in self._ids:
            self.list_workers()
        return self._ids.get(name)

    def drain(self, ids: list[str]) -> list[str]:
        signalled = []
        since = str(int(self._clock()))
        for name in ids:
            server_id = self._server_id(name)
            if server_id is None:
                continue
            try:
                self.conn.compute.set_server_metadata(server_id, **{META_STATE: "draining", META_DRAINING_SINCE: since})
            except _cloud_errors() as exc:
                log.error("provision.drain_failed", worker_id=name, error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            signalled.append(name)
        marked = registry.request_drain(self.dsn, signalled)
        for name in signalled:
            log.info("provision.drain", worker_id=name, registry=name in marked)
        return signalled

    def delete(self, ids: list[str]) -> list[str]:
        deleted = []
        for name in ids:
            server_id = self._server_id(name)
            if server_id is None:
                continue
            try:
                self.conn.compute.delete_server(server_id, ignore_missing=True)
            except _cloud_errors() as exc:
                log.error("provision.delete_failed", worker_id=name, error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            self._ids.pop(name, None)
            log.info("provision.deleted", worker_id=name, server_id=server_id)
            deleted.append(name)
        return deleted

    def down(self) -> list[str]:
        return self.drain([w.id for w in self.list_workers() if w.state != "stopped"])

    def headroom(self) -> int | None:
        """Servers of our flavor the project's compute quota still admits (-1 in Nova = unlimited).

        Checked before booting so a wave is sized to fit; the 403 on POST remains the backstop
        (quota is shared with everything else in the project and may change in between).
        """
        try:
            absolute = self.conn.compute.get_limits().absolute
            flavor = self._flavor
            if flavor is None and self.settings.flavor:
                flavor = self._flavor = self.conn.compute.find_flavor(self.settings.flavor, ignore_missing=False)
        except _cloud_errors() as exc:
            log.warning("provision.limits_unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
            return None
        room: list[int] = []

        def left(limit: Any, used: Any, per_server: Any) -> None:
            if limit is None or int(limit) < 0 or not per_server:
                return
            room.append(max(0, (int(limit) - int(used or 0)) // int(per_server)))

        left(absolute.instances, absolute.instances_used, 1)
        if flavor is not None:
            left(absolute.total_cores, absolute.total_cores_used, flavor.vcpus)
            left(absolute.total_ram, absolute.total_ram_used, flavor.ram)
        return min(room) if room else None
