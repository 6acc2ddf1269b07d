"""One Settings object, read from ORDERLEDGER_* environment variables at start-up."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything configurable about a running orderledger, with defaults for the embedded mode."""

    model_config = SettingsConfigDict(env_prefix="ORDERLEDGER_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///var/orderledger.db",
        description="Event store and read models: sqlite:///path.db or postgresql://user@host/db",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
