"""One Settings object, read from ORDERLEDGER_* environment variables at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Everything configurable about a running orderledger, with defaults for the embedded mode."""

    model_config = SettingsConfigDict(env_prefix="ORDERLEDGER_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///var/orderledger.db",
        description="Event store and read models: sqlite:///path.db or postgresql://user@host/db",
    )
    host: str = Field(default="127.0.0.1", description="Interface `orderledger serve` binds to")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `orderledger serve` binds to")
    log_level: LogLevel = Field(default="info", description="Server log level")

    # -- projections --------------------------------------------------------------------------
    read_model_database_url: str | None = Field(
        default=None,
        description="Where read models live; defaults to the event store's database",
    )
    run_projections: bool = Field(
        default=True,
        description="Run projection workers inside `orderledger serve` (the embedded mode)",
    )
    projection_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Most events applied in one transaction"
    )
    projection_poll_interval: float = Field(
        default=0.02, gt=0, le=10, description="Seconds between polls for new events (SQLite)"
    )
    projection_idle_wait: float = Field(
        default=0.5, gt=0, le=60, description="Longest wait for new events before re-checking"
    )
    projection_lease_ttl: float = Field(
        default=10.0, gt=0, le=600, description="Seconds before a dead worker's lease expires"
    )
    projection_stalled_after: float = Field(
        default=30.0, gt=0, description="A projection behind with no progress this long is stalled"
    )
    read_your_writes_timeout: float = Field(
        default=5.0, ge=0, le=60, description="Longest wait for min_position before a 503"
    )

    @property
    def read_model_url(self) -> str:
        return self.read_model_database_url or self.database_url
