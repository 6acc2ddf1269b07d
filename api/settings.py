"""One Settings object, read from ORDERLEDGER_* environment variables at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from projections.effects.targets import TargetPolicy, parse_networks

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["json", "text"]


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
    log_format: LogFormat = Field(
        default="json", description="Logs on stderr: one JSON object per line, or plain text"
    )
    metrics_public: bool = Field(
        default=False, description="Serve /metrics without an API key (default: admin keys only)"
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's native OpenTelemetry traces, metrics and logs, sent to the"
        " globally configured providers (off: each request skips the check for them)",
    )
    master_key: SecretStr | None = Field(
        default=None,
        description="Wraps every customer's data key (32 bytes, hex or URL-safe base64); "
        "required: personal data is never stored unencrypted. Losing it loses the personal "
        "data, not the orders",
    )
    previous_master_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated master keys still accepted while `orderledger customers "
        "rotate-key` re-wraps the data keys under master_key",
    )
    personal_key_cache_ttl: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="Seconds between a process's checks for erasures (data keys stay cached "
        "until one): an erasure takes effect everywhere within this time",
    )
    console_session_ttl: float = Field(
        default=8 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Seconds a console sign-in lasts before the operator signs in again",
    )
    key_cache_ttl: float = Field(
        default=1.0,
        ge=0,
        le=300,
        description="Seconds an API process trusts a key it checked: a revocation takes effect"
        " everywhere within this time (0: every request reads the key table)",
    )

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
    read_threads: int = Field(
        default=6,
        ge=1,
        le=64,
        description="Reads (lists, reports, histories) an API process runs at once; more wait",
    )

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(value)
        return value

    @property
    def webhook_targets(self) -> TargetPolicy:
        """Where webhooks may connect: public addresses and the allowed networks."""
        return TargetPolicy(parse_networks(self.webhook_allowed_networks))

    @property
    def read_model_url(self) -> str:
        return self.read_model_database_url or self.database_url

    # -- side effects ---------------------------------------------------------------------------
    run_effects: bool = Field(
        default=True,
        description="Deliver side effects (webhooks, email) wherever projections run",
    )
    effect_max_attempts: int = Field(default=8, ge=1, le=100, description="Attempts before dead")
    effect_backoff_base: float = Field(
        default=1.0, gt=0, description="Seconds: the first retry waits up to this (full jitter)"
    )
    effect_backoff_cap: float = Field(
        default=300.0, gt=0, description="Seconds: no wait between attempts is longer"
    )
    effect_timeout: float = Field(default=10.0, gt=0, le=300, description="Seconds per attempt")
    effect_concurrency: int = Field(default=8, ge=1, le=256, description="Deliveries at once")
    effect_per_target: int = Field(
        default=4, ge=1, le=256, description="Deliveries at once to one endpoint or address"
    )
    effect_claim_ttl: float = Field(
        default=60.0, gt=0, description="Seconds before a dead dispatcher's claim expires"
    )
    effect_reconcile_interval: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds between passes recording effects the outbox should hold and lacks",
    )
    webhook_allowed_networks: str = Field(
        default="",
        description="Comma-separated CIDRs webhooks may reach besides public addresses, "
        "e.g. 127.0.0.0/8 for a receiver on this machine (default: public addresses only)",
    )
    smtp_host: str = Field(default="127.0.0.1", description="SMTP server for customer emails")
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_from: str = Field(default="orders@orderledger.local", description="From address")
    smtp_starttls: bool = Field(default=False, description="Upgrade the SMTP connection to TLS")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
