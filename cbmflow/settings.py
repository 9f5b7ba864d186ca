"""Settings for every component, read from ``CBMFLOW_<COMPONENT>_<FIELD>`` environment variables.

Connection strings default to what ``cbmflow stack up`` wrote into the state directory, so a
developer never has to export anything to use the local stack, while a deployed worker VM gets
explicit values from its cloud-init environment file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field
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


class StackSettings(BaseSettings):
    """Ports and run-as user of the local PostgreSQL and RabbitMQ started by ``cbmflow stack``."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_STACK_")

    pg_port: int = 55432
    amqp_port: int = 55672
    management_port: int = 55673
    dist_port: int = 55674
    epmd_port: int = 55675
    run_as: str = Field("nobody", description="unprivileged user the servers run as when invoked as root")
    db_name: str = "cbmflow"
    db_user: str = "cbmflow"
    consumer_timeout_ms: int = 3 * 3600 * 1000


class DbSettings(BaseSettings):
    """PostgreSQL connection."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_DB_")

    dsn: str = ""

    def resolved_dsn(self) -> str:
        dsn = self.dsn or str(stack_info().get("dsn", ""))
        if not dsn:
            from cbmflow.errors import ConfigError

            raise ConfigError("no database: set CBMFLOW_DB_DSN or run `cbmflow stack up`")
        return dsn


class BusSettings(BaseSettings):
    """RabbitMQ connection and topology names."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_BUS_")

    amqp_url: str = ""
    management_url: str = ""
    queue: str = "cbmflow.extract"
    dead_letter_exchange: str = "cbmflow.dlx"
    dead_letter_queue: str = "cbmflow.extract.dead"
    delivery_limit: int = 5
    heartbeat_s: int = 60

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


class StoreSettings(BaseSettings):
    """Object storage: a local directory by default, S3 (boto3) when ``url`` starts with ``s3://``."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_STORE_")

    url: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""


class WatchSettings(BaseSettings):
    """Catalogue watcher."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_WATCH_")

    catalog_url: str = ""
    collections: list[str] = Field(default_factory=lambda: ["sentinel-2-l2a"])
    lookback_days: int = 60
    interval_s: float = 300.0
    page_size: int = 100


class WorkerSettings(BaseSettings):
    """Extraction worker."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_WORKER_")

    lease_s: float = 120.0
    heartbeat_s: float = 10.0
    stop_deadline_s: float = 600.0
    index_cache_entries: int = 8
    prefetch: int = 1
    idle_exit_s: float = 0.0
    drain_file: str = ""
    cache_dir: str = ""


class ApiSettings(BaseSettings):
    """REST API."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_API_")

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    auth_cache_s: float = 300.0
    server_title: str = "cbmflow"


class ProvisionSettings(BaseSettings):
    """Provisioner: driver and scaling bounds."""

    model_config = SettingsConfigDict(env_prefix="CBMFLOW_PROVISION_")

    driver: str = "local"
    min_workers: int = 0
    max_workers: int = 2
    per_worker: int = 5
    userdata_template: str = ""
    wheel_url: str = ""
