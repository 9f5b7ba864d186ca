"""Where products are read from: a local directory, or S3 (AWS, CDSE, CREODIAS, MinIO) in place.

Shared by the worker, ``cbmflow extract`` and the API chips. On S3 the two kinds of access go
two ways:

* listings and the small XML files go through the S3 API (boto3): a product's existence checks are
  **one** ListObjectsV2 of its prefix, cached for the life of the product object, instead of a
  HEAD per band;
* pixels go through GDAL's ``/vsis3/`` (HTTP range requests: only the JP2 tiles and COG blocks of
  the strips read), inside :func:`gdal_env`, and every read in the thread that makes it inside
  :func:`in_read_env` (JPEG2000 from S3 is decoded with one GDAL thread: see
  :data:`S3_READ_OPTIONS`).

Both use boto3's credential chain (environment, profile, instance role) and the endpoint, region
and addressing style of :class:`~cbmflow.settings.StoreSettings`, so they always talk to the same
endpoint as the same user. Without credentials requests are unsigned (public buckets).

**Store profiles.** Two catalogues may keep their products in two object stores (CDSE ``eodata``
with its own keys beside a public COG bucket on AWS). ``CBMFLOW_STORE_PROFILES`` names such stores
(:class:`~cbmflow.settings.StoreProfile`); a scene carries the name of its source's profile
(``scenes.store_profile``) and whoever reads it runs inside :func:`using_profile`, so every call
below (boto3 client, ``/vsis3/`` options, HEAD probes) goes to that store. The name travels in a
context variable rather than through every reader in ``card/`` and ``worker/``: a job is one
thread, and :func:`in_read_env` carries the name into prefetch threads. GDAL's options of a
profile are set on the bucket's own prefix (``/vsis3/<bucket>/``: GDAL takes the longest matching
prefix), so two endpoints are served at once; one bucket name therefore belongs to one profile
per process. No profile (the default) is the ``CBMFLOW_STORE_*`` settings on ``/vsis3/``, as before.

Errors of the store are ``OSError`` s that say which kind they are: :class:`StoreUnavailable`
(connection refused or cut, timeout, throttling, 5xx: worth retrying) and :class:`StoreRefused`
(no such bucket, access denied, a malformed request: retrying cannot help); a missing object is a
``FileNotFoundError``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path, PurePath
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlparse

from cbmflow.settings import StoreProfile, StoreSettings

VSIS3 = "/vsis3/"
P = ParamSpec("P")
R = TypeVar("R")
# Throttling and server-side codes that a later attempt may get past.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# What GDAL's curl layer says when the transfer, not the file, failed (asked after a HEAD of the
# same object succeeded, so an HTTP error here is the transport's: stale credentials, a blip).
_GDAL_NETWORK_HINTS = ("curl error", "http response code", "timed out", "timeout")


class StoreError(OSError):
    """An object store request failed."""


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with a server error; a retry may succeed."""


class StoreRefused(StoreError):
    """The store refused the request for good (no such bucket, access denied, bad request)."""


class UnknownStoreProfile(StoreRefused):
    """A scene names a store profile this process has no settings for (``CBMFLOW_STORE_PROFILES``)."""


class UnsupportedLocation(ValueError):
    """A location that is neither a local path, a ``file://`` URL nor an ``s3://`` URL."""


# --- profiles ------------------------------------------------------------------------------------

_profile: ContextVar[str] = ContextVar("cbmflow_store_profile", default="")


def current_profile() -> str:
    """The store profile the calling context reads with; ``""`` is the default store."""
    return _profile.get()


@contextmanager
def using_profile(name: str | None) -> Iterator[None]:
    """Read through store profile ``name`` (``None`` or ``""``: the default store) inside the block.

    The name is checked on entry, so a scene of an unconfigured profile fails at once with an
    :class:`UnknownStoreProfile` naming it, before any read goes to the wrong store.
    """
    name = name or ""
    profile_settings(name)
    token = _profile.set(name)
    try:
        yield
    finally:
        _profile.reset(token)


def profile_settings(name: str | None = None) -> StoreProfile:
    """The settings of profile ``name`` (default: :func:`current_profile`); ``""`` → ``CBMFLOW_STORE_*``."""
    name = current_profile() if name is None else name
    settings = StoreSettings()
    if not name:
        return StoreProfile(
            s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region, s3_path_style=settings.s3_path_style
        )
    try:
        return settings.profiles[name]
    except KeyError:
        known = ", ".join(sorted(settings.profiles)) or "none"
        raise UnknownStoreProfile(
            f"store profile {name!r} is not configured in CBMFLOW_STORE_PROFILES (configured: {known})"
        ) from None


# --- locations ------------------------------------------------------------------------------------


def is_s3(location: str) -> bool:
    """``s3://bucket/key`` or its GDAL form ``/vsis3/bucket/key``."""
    return location.startswith(VSIS3) or urlparse(location).scheme == "s3"


def parse_s3(location: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key`` or ``/vsis3/bucket/key``; the key without a trailing ``/``.

    Keys with empty, ``.`` or ``..`` segments are refused: they have no faithful GDAL path.
    """
    if location.startswith(VSIS3):
        bucket, _, key = location[len(VSIS3) :].partition("/")
    else:
        parsed = urlparse(location)
        if parsed.scheme != "s3":
            raise UnsupportedLocation(f"{location!r} is not an s3:// URL")
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
    key = key.rstrip("/")
    if not bucket:
        raise UnsupportedLocation(f"{location!r}: no bucket")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsupportedLocation(f"{location!r}: S3 keys with empty, '.' or '..' segments are not supported")
    return bucket, key


def s3_url(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def display(path: str | PurePath) -> str:
    """A path for messages: ``/vsis3/bucket/key`` is shown as ``s3://bucket/key``."""
    text = str(path)
    return "s3://" + text[len(VSIS3) :] if text.startswith(VSIS3) else text


def gdal_path(location: str) -> str:
    """``s3://bucket/key`` → ``/vsis3/bucket/key`` (ranged reads: only the blocks needed); else as is."""
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        return f"/vsis3/{parsed.netloc}/{parsed.path.lstrip('/')}"
    if parsed.scheme == "file":
        return parsed.path
    return location


# --- GDAL -----------------------------------------------------------------------------------------


def gdal_s3_options(store: StoreSettings | StoreProfile | None = None) -> dict[str, str]:
    """GDAL configuration for ``/vsis3/`` from StoreSettings (endpoint, addressing, region, HTTP).

    Credentials are not in here; :func:`gdal_env` adds boto3's.
    """
    store = store or profile_settings()
    opts: dict[str, str] = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the "directory" on every open
        "GDAL_HTTP_CONNECTTIMEOUT": "10",
        "GDAL_HTTP_LOW_SPEED_TIME": "60",  # a stalled transfer fails instead of hanging the job
        "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
        "GDAL_HTTP_MAX_RETRY": "3",  # 429 and 5xx answers are retried by GDAL itself
        "GDAL_HTTP_RETRY_DELAY": "1",
    }
    if store.s3_endpoint_url:
        endpoint = urlparse(store.s3_endpoint_url)
        opts["AWS_S3_ENDPOINT"] = endpoint.netloc or endpoint.path
        opts["AWS_HTTPS"] = "NO" if endpoint.scheme == "http" else "YES"
        opts["AWS_VIRTUAL_HOSTING"] = "NO" if store.s3_path_style else "YES"
    if store.s3_region:
        opts["AWS_REGION"] = store.s3_region
    return opts


_S3_KEYS = (
    "AWS_S3_ENDPOINT",
    "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_NO_SIGN_REQUEST",
)


def gdal_s3_config(store: StoreSettings | StoreProfile | None = None) -> dict[str, str | None]:
    """:func:`gdal_s3_options` plus boto3's credentials; ``None`` marks an option to unset."""
    store = store or profile_settings()
    config: dict[str, str | None] = dict.fromkeys(_S3_KEYS)
    config.update(gdal_s3_options(store))
    creds = None if getattr(store, "anonymous", False) else _session(store).get_credentials()
    if creds is None:
        config["AWS_NO_SIGN_REQUEST"] = "YES"  # no credentials anywhere: a public bucket
    else:
        frozen = creds.get_frozen_credentials()
        config["AWS_ACCESS_KEY_ID"] = frozen.access_key
        config["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
        config["AWS_SESSION_TOKEN"] = frozen.token or None
    return config


def _profile_config(store: StoreProfile) -> dict[str, str | None]:
    """:func:`gdal_s3_config` of a named profile, every key explicit.

    On a bucket prefix an unset key would fall through to the ``/vsis3/`` default store's value
    (its endpoint, its keys), so GDAL's own defaults are written out instead of ``None``.
    """
    config = gdal_s3_config(store)
    defaults = {
        "AWS_S3_ENDPOINT": "s3.amazonaws.com",
        "AWS_HTTPS": "YES",
        "AWS_VIRTUAL_HOSTING": "YES",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SESSION_TOKEN": "",
        "AWS_NO_SIGN_REQUEST": "NO",
    }
    return {key: defaults.get(key) if value is None else value for key, value in config.items()}


def _session(store: StoreSettings | StoreProfile) -> Any:
    """The boto3 session of a store: its credential env vars or AWS profile, else boto3's chain."""
    import boto3

    region = store.s3_region or None
    if isinstance(store, StoreProfile):
        if store.access_key_env or store.secret_key_env:
            missing = [v for v in (store.access_key_env, store.secret_key_env) if not os.environ.get(v)]
            if missing:
                raise StoreRefused(f"store credentials: environment variable(s) {', '.join(missing)} not set")
            return boto3.Session(
                aws_access_key_id=os.environ[store.access_key_env],
                aws_secret_access_key=os.environ[store.secret_key_env],
                region_name=region,
            )
        if store.aws_profile:
            return boto3.Session(profile_name=store.aws_profile, region_name=region)
    return boto3.Session(region_name=region)


@lru_cache(maxsize=1)
def _libgdal() -> Any | None:
    """The GDAL library rasterio is linked with, for the path-specific option calls rasterio does
    not wrap; None where it cannot be found.

    Found among the libraries mapped into this process, and told apart from another GDAL loaded
    beside it (pyogrio's wheel ships its own) by a config option set through rasterio.
    """
    import uuid

    from rasterio._env import del_gdal_config, set_gdal_config

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.rsplit(None, 1)[-1] for line in fh if "/libgdal" in line and ".so" in line}
    except OSError:
        return None
    sentinel = f"CBMFLOW_PROBE_{uuid.uuid4().hex}"
    set_gdal_config(sentinel, "rasterio")
    try:
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
                probe, setter, getter = (
                    lib.CPLGetConfigOption,
                    lib.VSISetPathSpecificOption,
                    lib.VSIGetPathSpecificOption,
                )
            except (OSError, AttributeError):
                continue
            probe.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            probe.restype = ctypes.c_char_p
            if probe(sentinel.encode(), None) != b"rasterio":
                continue  # another GDAL in the same process
            setter.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
            setter.restype = None
            getter.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
            getter.restype = ctypes.c_char_p
            return lib
    finally:
        del_gdal_config(sentinel)
    return None


_configure_lock = threading.Lock()


_configured_prefix: dict[tuple[str, str], str | None] = {}


def _configure_vsis3(config: dict[str, str | None], prefix: str = VSIS3) -> bool:
    """Set ``config`` as GDAL path-specific options of ``prefix`` (``/vsis3/`` or ``/vsis3/<bucket>/``);
    False where that is impossible.

    Only changed values are written (credentials change when they rotate), so readers in other
    threads never see a half-written configuration in the steady state.
    """
    lib = _libgdal()
    if lib is None:
        return False
    with _configure_lock:
        for key, value in config.items():
            if _configured_prefix.get((prefix, key), "\0unset") == value:
                continue
            lib.VSISetPathSpecificOption(prefix.encode(), key.encode(), None if value is None else value.encode())
            _configured_prefix[prefix, key] = value
    return True


def forget_cached(location: str) -> None:
    """Drop what GDAL's ``/vsicurl`` cache remembers under ``location`` (an ``s3://`` product).

    During a store outage GDAL caches the failed answers as "this file does not exist", and keeps
    serving them after the store is back: a retry would then read a product that exists as missing
    and fail it for good. Called before every retry after an outage; a no-op for local products.
    """
    if urlparse(location).scheme != "s3":
        return
    bucket, key = parse_s3(location)
    prefix = f"{VSIS3}{bucket}/{key.removesuffix('/MTD_MSIL2A.xml')}".rstrip("/")
    lib = _libgdal()
    if lib is None:
        return  # rasterio wraps no cache call; the path-specific options need the same handle anyway
    clear = lib.VSICurlPartialClearCache
    clear.argtypes = [ctypes.c_char_p]
    clear.restype = None
    clear(prefix.encode())


def gdal_option(path: str, key: str) -> str | None:
    """The value GDAL uses for option ``key`` when it opens ``path`` (path-specific, else config)."""
    lib = _libgdal()
    if lib is None:
        from rasterio.env import get_gdal_config

        value = get_gdal_config(key, normalize=False)
        return None if value is None else str(value)
    raw = lib.VSIGetPathSpecificOption(path.encode(), key.encode(), None)
    return None if raw is None else bytes(raw).decode()


# GDAL reads a JPEG2000 window of several tiles in threads of its own when GDAL_NUM_THREADS > 1,
# and a tile whose fetch fails there is left in the block cache as zeros with no error returned
# (GDAL 3.10's JP2OpenJPEG, dataset-level RasterIO, as rasterio reads): over a network that turns
# a dropped connection into nodata pixels, silently. One thread makes such a read fail instead.
# GDAL reads the option in the thread that reads, so it must be set there (see ``in_read_env``).
S3_READ_OPTIONS: dict[str, str] = {"GDAL_NUM_THREADS": "1"}


@contextmanager
def gdal_env(path: str | PurePath | None = None) -> Iterator[None]:
    """The GDAL environment for opening and reading ``path``: for an S3 path, the ``/vsis3/``
    settings and credentials (boto3's chain; unsigned without any) and :data:`S3_READ_OPTIONS`;
    for any other path, nothing.

    With no ``path`` the S3 environment is set up unconditionally. The ``/vsis3/`` settings are
    GDAL *path-specific* options (process-wide, seen by every thread), not ``rasterio.Env``
    options: rasterio sets options thread-locally outside the main thread, and a worker's job
    thread, its prefetch thread and GDAL's own threads must all reach the same endpoint. They stay
    set after the block (refreshed, credentials included, on every entry) and concern ``/vsis3/``
    paths only. Where the GDAL library cannot be reached for that, ``rasterio.Env`` carries them
    (enough in the main thread).
    """
    if path is not None and not is_s3(str(path)):
        yield
        return
    name = current_profile()
    store = profile_settings(name)
    if name and path is None:
        raise ValueError("gdal_env of a store profile needs the path: its options are set on the bucket's prefix")
    configured = (
        _configure_vsis3(_profile_config(store), f"{VSIS3}{parse_s3(str(path))[0]}/")
        if name
        else _configure_vsis3(gdal_s3_config(store))
    )
    if configured:
        with _read_options():
            yield
        return
    import rasterio
    from rasterio.session import AWSSession

    session = _session(store)
    unsigned = store.anonymous or session.get_credentials() is None
    options = {**gdal_s3_options(store), **S3_READ_OPTIONS}
    with rasterio.Env(session=AWSSession(session=session, aws_unsigned=unsigned), **options):
        yield


def in_read_env(path: str | PurePath, read: Callable[P, R]) -> Callable[P, R]:
    """``read`` run inside :func:`gdal_env` of ``path`` in whatever thread calls it (a prefetch
    thread, say); ``read`` itself for a path that is not on S3."""
    if not is_s3(str(path)):
        return read
    name = current_profile()  # a prefetch thread does not inherit the caller's context

    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        # The /vsis3/ settings are process-wide once gdal_env has set them; only the read options
        # are per thread (and cheap: no credential lookup per strip).
        with using_profile(name), _read_options() if _libgdal() is not None else gdal_env(path):
            return read(*args, **kwargs)

    return wrapped


def _read_options() -> Any:
    import rasterio
    from rasterio.session import DummySession

    # DummySession: no AWS session built from the environment on every entry (milliseconds each).
    return rasterio.Env(session=DummySession(), **S3_READ_OPTIONS)


def read_failure(path: str | PurePath, exc: BaseException) -> OSError | None:
    """Why GDAL could not read the S3 object at ``path``, told apart with one HEAD request.

    :class:`StoreUnavailable` when the store is at fault (unreachable, 5xx, or GDAL's own error
    says the transfer or an HTTP request failed), ``FileNotFoundError`` or :class:`StoreRefused` when the object is
    gone or denied, ``None`` when the object is there and readable, i.e. its content is bad.
    GDAL's message alone cannot tell: an unreachable endpoint reads "does not exist in the file
    system".
    """
    bucket, key = parse_s3(str(path))
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as probe:
        failure = store_error(probe, s3_url(bucket, key))
        if failure is None:
            raise
        return failure
    text = str(exc).lower()
    if any(hint in text for hint in _GDAL_NETWORK_HINTS):
        return StoreUnavailable(f"{s3_url(bucket, key)}: {exc}")
    return None


# --- S3 API ---------------------------------------------------------------------------------------


def s3_client(store: StoreSettings | StoreProfile | None = None) -> Any:
    """A boto3 S3 client for a store (default: the current profile's), cached per store settings."""
    if store is None:
        store = profile_settings()
    if isinstance(store, StoreSettings):
        store = StoreProfile(
            s3_endpoint_url=store.s3_endpoint_url, s3_region=store.s3_region, s3_path_style=store.s3_path_style
        )
    creds = (store.access_key_env, store.secret_key_env)
    # The key values are part of the cache key (rotated keys get a new client), never logged.
    keys = tuple(os.environ.get(v, "") for v in creds if v)
    return _client(store.model_dump_json(), keys)


@lru_cache(maxsize=8)
def _client(store_json: str, _keys: tuple[str, ...]) -> Any:
    from botocore import UNSIGNED
    from botocore.config import Config

    store = StoreProfile.model_validate_json(store_json)
    endpoint_url, path_style = store.s3_endpoint_url, store.s3_path_style
    session = _session(store)
    options: dict[str, Any] = {
        "retries": {"max_attempts": 3, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    if endpoint_url:
        options["s3"] = {"addressing_style": "path" if path_style else "virtual"}
    if store.anonymous or session.get_credentials() is None:
        options["signature_version"] = UNSIGNED
    return session.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))


def store_error(exc: BaseException, url: str) -> OSError | None:
    """The :class:`StoreError` (or ``FileNotFoundError``) for a boto3/botocore failure; None if not one.

    The one classification every reader and writer of the store uses, so that a job is retried
    for the same failures wherever it meets them: the transport's (refused, cut, timed out, a
    short or corrupt body, an instance-metadata blip) and the server's throttling and 5xx are
    transient; any other botocore error is the configuration's and a later attempt would fail
    alike."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(error.get("Message", "")) or code
        if code in _NOT_FOUND_CODES:
            return FileNotFoundError(errno.ENOENT, "no such object", url)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StoreUnavailable(f"{url}: {code or status}: {message}")
        return StoreRefused(f"{url}: {code or status}: {message}")
    transport = (
        bce.ConnectionError,  # refused, timed out connecting or reading
        bce.HTTPClientError,  # a cut connection, a broken response stream
        bce.IncompleteReadError,
        bce.ChecksumError,
        bce.FlexibleChecksumError,  # a body damaged on the way
        bce.CredentialRetrievalError,
        bce.MetadataRetrievalError,  # the credential or metadata service did not answer
    )
    if isinstance(exc, transport):
        return StoreUnavailable(f"{url}: {exc}")
    if isinstance(exc, bce.BotoCoreError):  # configuration: no region, bad endpoint, no credentials
        return StoreRefused(f"{url}: {exc}")
    return None


@contextmanager
def _mapped(url: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = store_error(exc, url)
        if mapped is None:
            raise
        raise mapped from exc


class S3ProductFiles:
    """The files of a product under ``s3://bucket/prefix/``, for :func:`card.s2.open_s2_product`.

    The first existence check lists the prefix once (ListObjectsV2, paginated) and keeps the
    listing; every later check is a set lookup. Where listing is denied but reading is allowed,
    checks fall back to one HEAD per file. XML is fetched with GetObject; pixels are left to GDAL.
    """

    def __init__(self, bucket: str, prefix: str, client: Any | None = None, listing: str = "") -> None:
        """``listing`` narrows the one listing to the keys under ``prefix/`` that start with it (the
        ``<ref>.`` of a BEAM-DIMAP product whose ``.dim`` and ``.data/`` sit in a shared folder)."""
        if not prefix:
            raise UnsupportedLocation(f"s3://{bucket}/: a product needs a key prefix, not a whole bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.listing = listing
        self._client = client
        self._profile = current_profile()  # the store it was opened in, whichever thread reads it later
        self._root = Path(VSIS3.rstrip("/"), bucket, *self.prefix.split("/"))  # a GDAL path, no local file
        self._listed: frozenset[str] | None = None
        self._heads: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.list_requests = 0
        self.head_requests = 0

    @property
    def root(self) -> Path:
        return self._root

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(profile_settings(self._profile))
        return self._client

    def url(self, rel: str = "") -> str:
        return s3_url(self.bucket, f"{self.prefix}/{rel}" if rel else self.prefix)

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel.lstrip('/')}"

    def read_bytes(self, rel: str) -> bytes:
        with _mapped(self.url(rel)):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

    def _listing(self) -> frozenset[str] | None:
        """The one listing, made on first use (under the lock); None once listing proved denied."""
        if self._listed is None and not self._heads:
            self._listed = self._list()
        return self._listed

    def exists(self, rel: str) -> bool:
        rel = rel.lstrip("/")
        with self._lock:
            listed = self._listing()
            if listed is not None:
                return rel in listed
            if rel not in self._heads:
                self._heads[rel] = self._head(rel)
            return self._heads[rel]

    def gdal_path(self, rel: str) -> str:
        return str(self._root / rel)

    def files_under(self, rel: str) -> list[str] | None:
        """Every key below ``rel`` ("" = the root), relative to the root; None where listing is denied."""
        with self._lock:
            listed = self._listing()
        if listed is None:
            return None
        base = f"{rel.strip('/')}/" if rel.strip("/") else ""
        return sorted(k for k in listed if k.startswith(base))

    def _list(self) -> frozenset[str] | None:
        """Every key under the prefix (and ``listing``), relative to the prefix; None where listing is denied."""
        start = f"{self.prefix}/"
        keys: set[str] = set()
        try:
            with _mapped(self.url()):
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=start + self.listing
                )
                for page in pages:
                    self.list_requests += 1
                    keys.update(obj["Key"][len(start) :] for obj in page.get("Contents", ()))
        except StoreRefused as exc:
            if "AccessDenied" not in str(exc):
                raise
            return None
        return frozenset(keys)

    def _head(self, rel: str) -> bool:
        self.head_requests += 1
        try:
            with _mapped(self.url(rel)):
                self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except FileNotFoundError:
            return False
        return True


# --- products -------------------------------------------------------------------------------------


DIMAP_SUFFIXES = (".dim", ".data")


def dimap_files(location: str) -> tuple[S3ProductFiles, str]:
    """The files of a BEAM-DIMAP product at ``s3://bucket/.../<ref>.dim`` (or ``<ref>.data``), and
    the entry :func:`card.s1.open_s1_dimap` starts from.

    One listing covers the product (only the keys starting with ``<ref>.``, not the archive folder
    around it). GDAL may list the product's own keys when it opens a band: the ENVI driver finds a
    ``.img``'s ``.hdr`` among its siblings, which :func:`gdal_s3_options` turns off elsewhere.
    """
    bucket, key = parse_s3(location)
    parent, _, name = key.rpartition("/")
    if not name.lower().endswith(DIMAP_SUFFIXES):
        raise UnsupportedLocation(f"{location}: a BEAM-DIMAP product is addressed by its .dim or .data")
    ref = name.rsplit(".", 1)[0]
    files = S3ProductFiles(bucket, parent, listing=f"{ref}.")
    _configure_vsis3({"GDAL_DISABLE_READDIR_ON_OPEN": "FALSE"}, f"{VSIS3}{bucket}/{parent}/{ref}.")
    return files, name


def product_files(location: str) -> Path | S3ProductFiles:
    """The files of the product at ``location`` (a local path, ``file://`` or ``s3://bucket/key``),
    for a reader in ``card/`` (e.g. :func:`card.s2.open_s2_product`).

    The store hands out files, readers stay with the formats: a ``.SAFE``'s metadata file name at the
    end of an S3 key is dropped, so the product's root is what is listed.
    """
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else location)
    if parsed.scheme == "s3":
        bucket, key = parse_s3(location)
        return S3ProductFiles(bucket, key.removesuffix("/MTD_MSIL2A.xml"))
    raise UnsupportedLocation(
        f"unsupported product location {location!r}: a local path, file:// or s3://bucket/key is expected"
    )
