"""Settings for every component, read from ``CBMFLOW_<COMPONENT>_<FIELD>`` environment variables.

Connection strings default to what ``cbmflow stack up`` wrote into the state directory, so a
developer never has to export anything to use the local stack, while a deployed worker VM gets
explicit values from its cloud-init environment file.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def state_dir() -> Path:
    """The state directory (``CBMFLOW_STATE_DIR``, default ``./.cbmflow``), absolute."""
    return Path(os.environ.get("CBMFLOW_STATE_DIR", ".cbmflow")).absolute()


def stack_info() -> dict[str, Any]:
    """What ``stack up`` recorded (DSN, URLs), or an empty dict when no local stack was started."""
    path = state_dir() / "stack.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class LogSettings(BaseSettings):
    """Logs of every process: stable event names with key=value facts, on stderr.

    ``auto`` picks by who reads stderr: a person at a terminal gets coloured console lines, while a
    worker writing to a log file or journald (no terminal) keeps JSON lines for machines to parse.
    """

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_LOG_")

    level: str = Field("INFO", description="log level: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    format: Literal["auto", "console", "json"] = Field(
        "auto",
        description="auto: coloured console lines when stderr is a terminal, JSON lines otherwise"
        " (log files, journald); console or json to force one",
    )

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        name = value.strip().upper()
        if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {value!r}")
        return name

    @field_validator("format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class StackSettings(BaseSettings):
    """Ports and run-as user of the local PostgreSQL and RabbitMQ started by ``cbmflow stack``."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_STACK_")

    pg_port: int = Field(55432, description="PostgreSQL port of the local stack")
    amqp_port: int = Field(55672, description="RabbitMQ AMQP port of the local stack")
    management_port: int = Field(55673, description="RabbitMQ management (HTTP API and console) port")
    dist_port: int = Field(55674, description="Erlang distribution port of the local RabbitMQ node")
    epmd_port: int = Field(
        55675, description="epmd port of the local RabbitMQ node (kept off 4369 so stacks never collide)"
    )
    run_as: str = Field("nobody", description="unprivileged user the servers run as when invoked as root")
    db_name: str = Field("cbmflow", description="database created by `stack up`")
    db_user: str = Field("cbmflow", description="database role created by `stack up`")
    consumer_timeout_ms: int = Field(
        3 * 3600 * 1000, description="RabbitMQ consumer_timeout; must exceed the longest job"
    )
    data_root: str = Field(
        "/var/lib/cbmflow/stacks",
        description="where the servers' data goes when run as root and run_as cannot reach the state directory"
        " (a checkout under a 0700 home): one directory per state directory; stack.json stays in the state directory",
    )
    worker_grace_s: float = Field(
        30.0, description="`stack down` drains the state directory's local workers, then kills those left after this"
    )


class DbSettings(BaseSettings):
    """PostgreSQL connection."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_DB_")

    dsn: str = Field("", description="PostgreSQL DSN; default: the local stack's, from stack.json")

    def resolved_dsn(self) -> str:
        dsn = self.dsn or str(stack_info().get("dsn", ""))
        if not dsn:
            from cbmflow.errors import ConfigError

            raise ConfigError("no database: set CBMFLOW_DB_DSN or run `cbmflow stack up`")
        return dsn


class BusSettings(BaseSettings):
    """RabbitMQ connection and topology names."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_BUS_")

    amqp_url: str = Field("", description="AMQP URL (vhost in the path); default: the local stack's")
    management_url: str = Field(
        "", description="RabbitMQ management API base URL with credentials; default: the local stack's"
    )
    queue: str = Field("cbmflow.extract", description="quorum queue of ExtractParcels jobs")
    card_queue: str = Field(
        "cbmflow.card", description="quorum queue of GenerateCard jobs (minutes and gigabytes each: their own pool)"
    )
    dead_letter_exchange: str = Field("cbmflow.dlx", description="exchange that receives rejected and over-limit jobs")
    dead_letter_queue: str = Field("cbmflow.extract.dead", description="queue bound to the dead-letter exchange")
    delivery_limit: int = Field(5, description="x-delivery-limit of the job queue: deliveries before dead-lettering")
    heartbeat_s: int = Field(60, description="AMQP heartbeat")

    def queue_for(self, kind: str) -> str:
        """The queue a job kind travels on: CARD generation apart from extraction."""
        return self.card_queue if kind == "GenerateCard" else self.queue

    @property
    def job_queues(self) -> tuple[str, ...]:
        return (self.queue, self.card_queue)

    def resolved_amqp_url(self) -> str:
        url = self.amqp_url or str(stack_info().get("amqp_url", ""))
        if not url:
            from cbmflow.errors import ConfigError

            raise ConfigError("no broker: set CBMFLOW_BUS_AMQP_URL or run `cbmflow stack up`")
        return url

    def resolved_management_url(self) -> str:
        url = self.management_url or str(stack_info().get("management_url", ""))
        if not url:
            from cbmflow.errors import ConfigError

            raise ConfigError("no management API: set CBMFLOW_BUS_MANAGEMENT_URL or run `cbmflow stack up`")
        return url


class StoreProfile(BaseModel):
    """One named object store (an entry of ``CBMFLOW_STORE_PROFILES``): where a catalogue's products live.

    Holds no secrets: credentials come from environment variables named here, from a profile of
    the AWS shared credentials file, or from nowhere (``anonymous``, a public bucket). The scenes
    table carries only the profile's name.
    """

    model_config = ConfigDict(extra="forbid")

    s3_endpoint_url: str = Field("", description="S3 endpoint; empty = AWS")
    s3_region: str = ""
    s3_path_style: bool = True
    access_key_env: str = Field("", description="name of the environment variable holding the access key id")
    secret_key_env: str = Field("", description="name of the environment variable holding the secret key")
    aws_profile: str = Field("", description="profile of the AWS shared credentials/config files")
    anonymous: bool = Field(False, description="unsigned requests (public bucket), whatever credentials exist")


class StoreSettings(BaseSettings):
    """Object storage: a local directory by default, S3 (boto3) when ``url`` starts with ``s3://``."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_STORE_")

    url: str = Field("", description="object store root: a local directory (default) or s3://bucket/prefix")
    s3_endpoint_url: str = Field("", description="custom S3 endpoint (CDSE, CREODIAS, MinIO)")
    s3_region: str = Field("", description="S3 region")
    s3_path_style: bool = Field(
        True, description="path-style S3 URLs with a custom endpoint (MinIO, CDSE); false = virtual-hosted buckets"
    )
    profiles: dict[str, StoreProfile] = Field(
        default_factory=dict,
        description="JSON object: named object stores (endpoint, region, credential env var names) a source's"
        " `store` names; scenes of a source without one use the settings above",
    )


class SourceSettings(BaseModel):
    """One catalogue the watcher polls (an entry of ``CBMFLOW_WATCH_SOURCES``, a JSON list).

    ``store`` names the object store of the source's products (a key of ``CBMFLOW_STORE_PROFILES``,
    e.g. CDSE ``eodata`` beside a public COG bucket); its scenes carry that name to the worker and
    the API. Empty: the ``CBMFLOW_STORE_*`` settings.
    """

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="stable name: cursors and rejections are keyed on it"
    )
    kind: Literal["stac", "odata", "static"] = "stac"
    url: str
    collections: list[str] = Field(default_factory=lambda: ["sentinel-2-l2a"])
    cursor_property: str = Field(
        "published", description="STAC item property the incremental cursor follows; empty = rescan the lookback"
    )
    username: str = ""
    password: SecretStr = SecretStr("")
    rate_per_s: float = Field(4.0, gt=0, description="most requests per second to this source")
    request_budget: int = Field(1000, ge=1, description="most HTTP requests to this source per cycle")
    store: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$", description="store profile of its products")


class WatchSettings(BaseSettings):
    """Catalogue watcher."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_WATCH_")

    catalog_url: str = Field("", description="STAC API URL or path of a static catalog.json")
    collections: list[str] = Field(default_factory=lambda: ["sentinel-2-l2a"], description="STAC collections to watch")
    sources: list[SourceSettings] = Field(
        default_factory=list, description="JSON list of sources (name, kind, url, collections…); adds to catalog_url"
    )
    lookback_days: int = Field(
        60,
        description="acquisition window of each poll (bounds late arrivals); 0 = unbounded",
    )
    overlap_s: float = Field(7200.0, description="publication-time window re-read below each cursor (late arrivals)")
    interval_s: float = Field(300.0, description="seconds between watch cycles")
    page_size: int = Field(100, description="STAC search page size")
    request_timeout_s: float = Field(30.0, description="connect and read timeout of one catalogue request")
    max_retries: int = Field(5, description="retries of one request on 429/5xx or a network error")
    retry_max_wait_s: float = Field(120.0, description="longest wait before a retry (caps Retry-After)")
    metrics_port: int = Field(0, description="Prometheus /metrics port of `watch --interval`; 0 = off")
    deleted_sweep_s: float = Field(
        86400.0,
        description="seconds between complete listings of a STAC source's acquisition window, which find items"
        " deleted from it (STAC has no deletion feed); 0 = every cycle, negative = never",
    )

    def all_sources(self) -> list[SourceSettings]:
        """``sources`` plus, when set, ``catalog_url`` as the source named ``default``."""
        out = list(self.sources)
        if self.catalog_url:
            parsed = self.catalog_url.split("://", 1)
            static = len(parsed) == 1 or parsed[0] == "file" or self.catalog_url.endswith(".json")
            kind: Literal["stac", "static"] = "static" if static else "stac"
            out.insert(0, SourceSettings(name="default", kind=kind, url=self.catalog_url, collections=self.collections))
        return out


class WorkerSettings(BaseSettings):
    """Extraction worker."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_WORKER_")

    job_kinds: list[str] = Field(
        default_factory=lambda: ["ExtractParcels", "GenerateCard"],
        description="job kinds this worker consumes (JSON list; each kind has its queue): a pool of CARD VMs"
        ' sets ["GenerateCard"], an extraction pool ["ExtractParcels"]',
    )
    lease_s: float = Field(
        120.0, description="scene lease; renewed every heartbeat, taken over by another worker after expiry"
    )
    heartbeat_s: float = Field(10.0, description="worker registry heartbeat and lease renewal period")
    stop_deadline_s: float = Field(
        600.0, description="on SIGTERM/drain, how long the current job may run before it is requeued"
    )
    index_cache_entries: int = Field(8, description="parcel indexes (dataset x grid) kept in memory")
    prefetch: int = Field(1, description="AMQP prefetch; 1 so a long job never hoards others")
    idle_exit_s: float = Field(0.0, description="exit after this many idle seconds; 0 = never")
    drain_file: str = Field("", description="if this file exists the worker drains and exits")
    cache_dir: str = Field("", description="directory for on-disk parcel index cache; empty = memory only")
    index_cache_url: str = Field(
        "",
        description="parcel index cache shared by a fleet in the object store (s3://bucket/prefix/, the default store"
        " profile): the first transient VM to build a tile's index leaves it for the others; one prefix per"
        " deployment; empty = none",
    )
    backoff_max_s: float = Field(
        30.0,
        description="ceiling of the exponential backoffs: AMQP reconnects, database retries, requeue delays",
    )
    metrics_port: int = Field(
        0, description="Prometheus /metrics port; 0 = ephemeral (recorded in the workers registry), -1 = off"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="bind address of /metrics; 0.0.0.0 lets a scraper on another host reach it"
    )
    unreachable_exit_s: float = Field(
        600.0,
        ge=0,
        description="exit with code 75 once the broker and the database have both been unreachable this long without"
        " a break (a stack that went down for good); 0 = retry forever. An outage of one of them alone never counts",
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads per worker: 0 = every core (one decodes the next strip while the others reduce:"
        " lowest time per scene); 1 = one core, decode and reduce take turns (run one worker per core for the"
        " most scenes per hour)",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness the worker runs at (never lowered below the one it was started with): on a host"
        " it shares with the API and PostgreSQL, requests are answered first and batch work takes the rest; on a"
        " worker VM of its own it changes nothing",
    )
    card_output_url: str = Field(
        "",
        description="where GenerateCard jobs write their COGs: a local directory or s3://bucket/prefix; empty ="
        " CBMFLOW_STORE_URL, else <state dir>/store (local: only workers on this machine can read them)",
    )
    card_dem: str = Field(
        "flat",
        description="DEM of CARD generation: flat (height 0 on the WGS84 ellipsoid: GTC, not RTC), glo30 (Copernicus"
        " GLO-30 tiles from card_dem_bucket, cached) or the path of a DEM raster GDAL opens (GeoTIFF, VRT)",
    )
    card_dem_geoid: str = Field(
        "",
        description="geoid of the card_dem heights: egm96 or egm2008 (made ellipsoidal); empty = ellipsoidal for a"
        " file, the best installed grid for glo30",
    )
    card_dem_bucket: str = Field(
        "s3://copernicus-dem-30m",
        description="where glo30 tiles are (s3://bucket[/prefix]); AWS's public bucket is read unsigned, any other"
        " through the default object store (CDSE: s3://eodata/auxdata/CopDEM_COG/copernicus-dem-30m)",
    )
    card_dem_cache_dir: str = Field(
        "", description="local cache of glo30 tiles, shared by a machine's jobs; empty = <state dir>/glo30"
    )
    card_quantity: Literal["gamma0-rtc", "gamma0", "sigma0", "beta0"] = Field(
        "gamma0-rtc", description="backscatter quantity of bs scenes (linear): gamma0-rtc is terrain-flattened"
    )
    card_denoise: bool = Field(True, description="remove thermal noise (IPF noise vectors) before calibration")
    card_threads: int = Field(
        0,
        ge=0,
        description="threads of a CARD job's block loop: 0 = every CPU the worker may use (a CARD VM runs one job"
        " at a time); the output is the same for any number",
    )
    card_extent: Literal["aoi", "tile"] = Field(
        "aoi",
        description="aoi: per MGRS tile, only the part covering the AOIs (plus card_margin_m), on the tile's own 10 m"
        " lattice; tile: the whole 109.8 km tile (minutes of CPU per polarisation)",
    )
    card_margin_m: float = Field(200.0, ge=0, description="margin around the AOIs of an aoi-extent CARD grid")
    card_scratch_dir: str = Field(
        "",
        description="where a CARD job downloads its GRD and writes its COGs before publishing them (about the"
        " GRD's size plus one tile's outputs, removed after the job); empty = the system's temporary directory",
    )


class ApiSettings(BaseSettings):
    """REST API."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_API_")

    host: str = Field("127.0.0.1", description="API bind address")
    port: int = Field(8080, description="API port")
    workers: int = Field(1, description="API worker processes")
    auth_cache_s: float = Field(300.0, description="how long a verified (user, password) pair is cached")
    server_title: str = Field("cbmflow", description="title reported by /query/info")
    pool_size: int = Field(10, description="database connections per API process")
    statement_timeout_s: float = Field(30.0, description="per-query timeout; a slower query answers 503")
    polygon_limit: int = Field(100, description="most parcels parcelsByPolygon returns")
    dataset_cache_s: float = Field(
        5.0, description="how long the datasets table is cached per API process; 0 = read on every request"
    )
    chip_limit: int = Field(24, description="most scenes rawChipByLocation/chipsByLocation answer; more is a 400")
    chip_ttl_s: int = Field(3600, description="how long a signed chip URL from rawChipByLocation stays valid")
    chip_secret: str = Field(
        "",
        description="key signing chip URLs; empty = one generated in the state directory "
        "(set it when several API hosts share a load balancer)",
    )
    dsn: str = Field(
        "",
        description="PostgreSQL DSN of the API's own role (`cbmflow db role-dsn api`: SELECT only);"
        " empty = CBMFLOW_DB_DSN",
    )
    token_ttl_days: float = Field(
        90.0, description="validity of a new API token when `users token` gets no --expires; 0 = never expires"
    )
    session_ttl_s: int = Field(
        3600,
        ge=60,
        description="validity of an explorer session token (POST /api/v1/auth/token); a new one needs the password",
    )
    login_backoff_base_s: float = Field(
        1.0, description="lockout after the first failed logins of a user or client address; doubles per failure"
    )
    login_backoff_max_s: float = Field(300.0, description="longest lockout after repeated failed logins")
    login_free_failures: int = Field(
        3,
        description="distinct failed logins per (user, client address) before the backoff starts; a client"
        " address alone gets five times as many",
    )
    allow_plain_basic: bool = Field(
        False,
        description="accept passwords and tokens over plain HTTP from non-loopback clients (behind a TLS proxy"
        " that connects over loopback this is not needed)",
    )
    tls_cert: str = Field("", description="PEM certificate: serve HTTPS (with tls_key)")
    tls_key: str = Field("", description="PEM private key of tls_cert")
    trusted_proxies: str = Field(
        "",
        description="addresses or networks (comma-separated, e.g. 127.0.0.1 or 10.0.0.0/24) of reverse proxies"
        " whose X-Forwarded-For and X-Forwarded-Proto name the client and scheme (login throttle, plain-HTTP"
        " refusal); empty = none, the connecting peer is the client",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        # No '*': a header believed from anyone lets every client pick the address it is throttled by.
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    def proxy_hosts(self) -> list[str]:
        """``trusted_proxies`` as a list (empty: no proxy is trusted), networks in canonical form:
        uvicorn would take ``10.1.2.3/8`` for a name, not a network, and never match it."""
        parts = [part.strip() for part in self.trusted_proxies.split(",") if part.strip()]
        return [str(ipaddress.ip_network(p, strict=False)) if "/" in p else p for p in parts]

    def resolved_dsn(self) -> str:
        """The API role's DSN, else the general database DSN (the owner's: works, but can write)."""
        return self.dsn or DbSettings().resolved_dsn()


class PoolSettings(BaseModel):
    """One worker pool (an entry of ``CBMFLOW_PROVISION_POOLS``): the job kinds its workers consume,
    whose queues' backlog drives it, and its own bounds, flavor and image.

    Pools exist because jobs differ by orders of magnitude: a CARD job takes minutes and gigabytes,
    an extraction seconds, so each kind gets machines of its size that grow and shrink with their
    own queue. A key left out takes the ``CBMFLOW_PROVISION_<KEY>`` value; the control law is the
    same for every pool.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,39}$",
        description="pool name: tagged on its servers (cbmflow-pool-<name>) and part of their names",
    )
    job_kinds: list[str] = Field(min_length=1, description="job kinds its workers consume (CBMFLOW_WORKER_JOB_KINDS)")
    min_workers: int | None = None
    max_workers: int | None = None
    per_worker: int | None = None
    max_surge: int | None = None
    scale_down_window_s: float | None = None
    cooldown_s: float | None = None
    boot_timeout_s: float | None = None
    max_lifetime_s: float | None = None
    drain_timeout_s: float | None = None
    stale_heartbeat_s: float | None = None
    image: str | None = None
    flavor: str | None = None
    network: str | None = None
    key_name: str | None = None
    security_groups: list[str] | None = None
    install: str | None = None
    wheel_url: str | None = None
    index_url: str | None = None
    userdata_template: str | None = None
    worker_env: dict[str, str] | None = None


class ProvisionSettings(BaseSettings):
    """Provisioner: driver, scaling bounds and timings, OpenStack placement, SSH for operator commands.

    The scale-down window and cooldown default per driver: local workers are processes that start
    in a second, so holding idle ones back buys nothing (and ``make demo`` drains them at once),
    while a VM costs minutes to boot and is billed while it does, so it is worth keeping through a
    dip in the backlog. HPA stabilises over 300 s; the watcher publishes every 300 s, so the window
    spans three polls (``provision simulate`` shows the difference in reversals).
    """

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_PROVISION_")

    driver: str = Field("local", description="worker driver: local (processes) or openstack")
    min_workers: int = Field(0, description="fewest workers kept")
    max_workers: int = Field(2, description="most workers started")
    per_worker: int = Field(5, description="backlog (ready + unacked jobs) one worker is expected to absorb")
    max_surge: int = Field(4, description="most workers started by one control step")
    scale_down_window_s: float | None = Field(
        None,
        description="scale-down follows the highest want seen over this window (HPA stabilisation); "
        "unset = driver default: local 0, openstack 900 (three watcher polls)",
    )
    cooldown_s: float | None = Field(
        None,
        description="no scale-down sooner than this after the last scale event; "
        "unset = driver default: local 0, openstack 300",
    )
    boot_timeout_s: float = Field(
        900.0, description="a server whose worker has not registered by then is deleted (boot or install failed)"
    )
    max_lifetime_s: float = Field(86400.0, description="workers older than this are drained and replaced; 0 = no limit")
    drain_timeout_s: float = Field(
        900.0,
        description="a draining server is deleted after this even without a stopped report; "
        "keep it above CBMFLOW_WORKER_STOP_DEADLINE_S",
    )
    stale_heartbeat_s: float = Field(
        300.0, description="a busy worker silent for this long is dead (its lease expired) and no longer protected"
    )
    interval_s: float = Field(60.0, description="seconds between control steps of `provision watch`")
    userdata_template: str = Field(
        "", description="path of an extra cloud-config YAML merged under the worker's pieces"
    )
    wheel_url: str = Field("", description="where VMs install cbmflow from (wheel URL); empty = pre-baked image")
    install: str = Field(
        "", description="how VMs get cbmflow: wheel, index or preinstalled; empty = wheel if a wheel URL is set"
    )
    index_url: str = Field("", description="package index for install=index; empty = PyPI")
    pool: str = Field(
        "default",
        description="name of the one pool when `pools` is empty; tagged on its servers, so two pools never touch"
        " each other's servers",
    )
    job_kinds: list[str] = Field(
        default_factory=lambda: ["ExtractParcels", "GenerateCard"],
        description="job kinds the workers of the one pool consume (JSON list; written into their"
        " CBMFLOW_WORKER_JOB_KINDS): the backlog that drives the pool is the sum of those kinds' queues",
    )
    worker_env: dict[str, str] = Field(
        default_factory=dict,
        description="extra environment written into every worker's user-data (JSON object), e.g."
        ' {"CBMFLOW_WORKER_STOP_DEADLINE_S": "1800"} for long CARD jobs; a pool may set its own',
    )
    pools: list[PoolSettings] = Field(
        default_factory=list,
        description="JSON list of worker pools, each scaled on its own queue(s) by the same control law: name,"
        " job_kinds, and any of min_workers, max_workers, per_worker, max_surge, scale_down_window_s, cooldown_s,"
        " image, flavor, network, worker_env… (a key left out takes the CBMFLOW_PROVISION_ value); e.g."
        ' [{"name": "extract", "job_kinds": ["ExtractParcels"], "max_workers": 20}, {"name": "card",'
        ' "job_kinds": ["GenerateCard"], "flavor": "eo2.xlarge", "per_worker": 1, "max_workers": 8}];'
        " a job kind belongs to one pool at most. Empty = one pool from the settings above",
    )
    cloud: str = Field("", description="clouds.yaml entry for the openstack driver; empty = OS_CLOUD")
    image: str = Field("", description="image name or id of worker VMs (openstack)")
    flavor: str = Field("", description="flavor name or id of worker VMs (openstack)")
    network: str = Field("", description="network name or id worker VMs attach to (openstack)")
    key_name: str = Field(
        "", description="Nova key pair injected into worker VMs, for `provision logs` and `provision exec`"
    )
    security_groups: list[str] = Field(
        default_factory=list, description="security groups of worker VMs (JSON list); empty = the project's default"
    )
    api_timeout_s: float = Field(60.0, description="timeout of each OpenStack API request")
    ssh_user: str = Field("debian", description="SSH user of `provision logs` and `exec` (the image's default user)")
    ssh_key_file: str = Field("", description="private key for `provision logs` and `exec`; empty = ssh-agent")
    ssh_gateway: str = Field("", description="bastion host (user@host) for SSH to workers without a public address")
    worker_dsn: str = Field(
        "",
        description="DSN written into worker user-data (`cbmflow db role-dsn worker`); empty = CBMFLOW_DB_DSN"
        " with a warning (the owner's DSN on every VM)",
    )
    worker_amqp_url: str = Field(
        "",
        description="AMQP URL written into worker user-data (`cbmflow bus role-url worker`); empty ="
        " CBMFLOW_BUS_AMQP_URL with a warning",
    )

    @field_validator("pools")
    @classmethod
    def _pools_apart(cls, pools: list[PoolSettings]) -> list[PoolSettings]:
        """Two pools on one queue would each scale on the whole backlog: twice the workers wanted."""
        names = [p.name for p in pools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"pool names must be unique: {', '.join(twice)}")
        owner: dict[str, str] = {}
        for p in pools:
            for kind in p.job_kinds:
                if kind in owner and owner[kind] != p.name:
                    raise ValueError(f"job kind {kind} is in pools {owner[kind]} and {p.name}: give it to one")
                owner[kind] = p.name
        return pools

    def resolved_pools(self) -> list[ProvisionSettings]:
        """One ``ProvisionSettings`` per pool, the pool's keys over these settings (its ``pool`` = its
        name, no ``pools`` of its own); without ``pools``, these settings are the one pool."""
        if not self.pools:
            return [self]
        out = []
        for p in self.pools:
            update = p.model_dump(exclude={"name"}, exclude_none=True)
            out.append(self.model_copy(update={**update, "pool": p.name, "pools": []}))
        return out

    def effective_scale_down_window_s(self) -> float:
        if self.scale_down_window_s is not None:
            return self.scale_down_window_s
        return 0.0 if self.driver == "local" else 900.0

    def effective_cooldown_s(self) -> float:
        if self.cooldown_s is not None:
            return self.cooldown_s
        return 0.0 if self.driver == "local" else 300.0


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    LogSettings,
    StackSettings,
    DbSettings,
    BusSettings,
    StoreSettings,
    WatchSettings,
    WorkerSettings,
    ApiSettings,
    ProvisionSettings,
)


def settings_table() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, for docs and ``cbmflow settings``."""
    rows = [
        ("CBMFLOW_STATE_DIR", ".cbmflow", "state directory: local stack data, stack.json, demo world, worker logs"),
    ]
    for cls in ALL_SETTINGS:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, info in cls.model_fields.items():
            default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
            rows.append((f"{prefix}{name.upper()}", "" if default is None else str(default), info.description or ""))
    return rows
