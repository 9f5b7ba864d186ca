"""The worker's cache of parcel indexes: memory, then a local directory, then the object store.

Building the index of a full tile (the PostGIS query and the rasterization of every parcel on
it) costs about three times the extraction of the scene itself (9.8 s against ~3 s, the
rehearsal in docs/performance.md). A long-lived worker pays it once per tile, but a transient
VM starts cold, and a fleet of 20 of them would each build every tile's index again. The
shared tier (``CBMFLOW_WORKER_INDEX_CACHE_URL``, an ``s3://bucket/prefix/``) lets the first VM
that builds a tile's index leave it for the others.

Every tier is an optimisation and never a reason to fail a job: an unreadable, unwritable or
unreachable tier is logged and the index is built from PostGIS as if it were empty.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbmflow import store
from cbmflow.errors import ConfigError
from cbmflow.logging import get_logger
from worker import engine

log = get_logger("worker")


class IndexCache:
    """An LRU of parcel indexes keyed by dataset, parcel version, buffer, CRS, transform and shape,
    backed by an optional on-disk cache (``CBMFLOW_WORKER_CACHE_DIR``) and an optional shared one
    in the object store (``CBMFLOW_WORKER_INDEX_CACHE_URL``).

    The key includes ``parcels_version``, which every parcel import bumps, so a changed parcel set
    can never be served from a stale index. The disk copy lets a restarted worker (or a fresh VM
    with a persistent volume) skip the PostGIS query and the rasterization: a 100k-parcel index
    loads in well under a second where building it takes several. Files are written to a temporary
    name and renamed, so concurrent workers sharing the directory never read a partial file; an
    S3 PUT is atomic, so two VMs that built the same index at once just write it twice.
    """

    def __init__(self, entries: int = 8, cache_dir: str | Path | None = None, shared_url: str | None = None) -> None:
        self.entries = entries
        if cache_dir is None or shared_url is None:
            from cbmflow.settings import WorkerSettings

            settings = WorkerSettings()
            cache_dir = settings.cache_dir if cache_dir is None else cache_dir
            shared_url = settings.index_cache_url if shared_url is None else shared_url
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.shared: tuple[str, str] | None = None
        if shared_url:
            if not store.is_s3(shared_url):
                raise ConfigError(
                    f"CBMFLOW_WORKER_INDEX_CACHE_URL {shared_url!r}: use s3://bucket/prefix/"
                    " (a directory shared by the workers is CBMFLOW_WORKER_CACHE_DIR)"
                )
            bucket, prefix = store.parse_s3(shared_url)
            self.shared = (bucket, prefix.strip("/"))
        self._items: OrderedDict[tuple[Any, ...], engine.ParcelIndex] = OrderedDict()
        self.hits = 0
        self.disk_hits = 0
        self.shared_hits = 0
        self.misses = 0

    @staticmethod
    def _name(key: tuple[Any, ...]) -> str:
        return f"index-{hashlib.sha256(repr(key).encode()).hexdigest()[:40]}.npz"

    def _file(self, key: tuple[Any, ...]) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / self._name(key)

    def _object(self, key: tuple[Any, ...]) -> tuple[str, str]:
        assert self.shared is not None
        bucket, prefix = self.shared
        return bucket, f"{prefix}/{self._name(key)}" if prefix else self._name(key)

    def get(self, key: tuple[Any, ...]) -> engine.ParcelIndex | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return item
        path = self._file(key)
        if path is not None and path.is_file():
            try:
                item = engine.ParcelIndex.load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("index_cache.unreadable", path=str(path), error=str(exc))
            else:
                self.disk_hits += 1
                self._remember(key, item)
                return item
        if self.shared is not None:
            item = self._fetch(key, path)
            if item is not None:
                self.shared_hits += 1
                self._remember(key, item)
        return item

    def put(self, key: tuple[Any, ...], index: engine.ParcelIndex) -> None:
        self.misses += 1
        self._remember(key, index)
        path = self._file(key)
        if path is not None and not _keep(path, index.save):
            path = None
        if self.shared is not None:
            self._publish(key, index, path)

    def _fetch(self, key: tuple[Any, ...], path: Path | None) -> engine.ParcelIndex | None:
        """The index from the shared tier (kept in the local directory too, when there is one)."""
        bucket, name = self._object(key)
        url = store.s3_url(bucket, name)
        with tempfile.TemporaryDirectory(prefix="cbmflow-index-") as tmpdir:
            tmp = Path(tmpdir) / "index.npz"
            try:
                body = store.s3_client().get_object(Bucket=bucket, Key=name)["Body"]
                with open(tmp, "wb") as out:
                    for chunk in body.iter_chunks(1 << 20):
                        out.write(chunk)
                item = engine.ParcelIndex.load(tmp)
            except Exception as exc:  # noqa: BLE001 - a miss, the store away or a bad object: build it
                if isinstance(store.store_error(exc, url), FileNotFoundError):
                    return None
                log.warning("index_cache.shared_unreadable", url=url, error=f"{type(exc).__name__}: {exc}"[:300])
                return None
            if path is not None:
                _keep(path, lambda part: shutil.copyfile(tmp, part))
        log.info("index_cache.shared_hit", url=url)
        return item

    def _publish(self, key: tuple[Any, ...], index: engine.ParcelIndex, path: Path | None) -> None:
        bucket, name = self._object(key)
        url = store.s3_url(bucket, name)
        try:
            with tempfile.TemporaryDirectory(prefix="cbmflow-index-") as tmpdir:
                if path is None:
                    path = Path(tmpdir) / "index.npz"
                    index.save(path)
                with open(path, "rb") as body:
                    store.s3_client().put_object(Bucket=bucket, Key=name, Body=body)
        except Exception as exc:  # noqa: BLE001 - the next VM builds it again; this job goes on
            log.warning("index_cache.shared_write_failed", url=url, error=f"{type(exc).__name__}: {exc}"[:300])
            return
        log.info("index_cache.shared_put", url=url)

    def _remember(self, key: tuple[Any, ...], index: engine.ParcelIndex) -> None:
        self._items[key] = index
        self._items.move_to_end(key)
        while len(self._items) > self.entries:
            self._items.popitem(last=False)


def _keep(path: Path, write: Callable[[Path], object]) -> bool:
    """Into the cache directory by a temporary name and a rename, so that workers sharing it never
    read a partial file; False (logged) where the disk refuses: a full or read-only cache disk
    must not fail the job."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(part)
        os.replace(part, path)
    except OSError as exc:
        log.warning("index_cache.write_failed", path=str(path), error=str(exc))
        return False
    return True
