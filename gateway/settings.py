"""Settings: environment variables prefixed ``BRYGGA_``, an optional TOML file, safe defaults.

The defaults are the embedded mode: SQLite under ``./var/``, a Kafka-protocol broker the
gateway starts itself on loopback, listeners bound to loopback only.
"""

from __future__ import annotations

import os
import ssl
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ALL_STAGES = ("intake", "consent", "route", "deliver", "receipts", "relay", "reconcile", "api")


class Settings(BaseSettings):
    """Every knob of one gateway process. Read once at start-up; pass it down, never re-read."""

    model_config = SettingsConfigDict(
        env_prefix="BRYGGA_",
        toml_file=os.environ.get("BRYGGA_CONFIG", "brygga.toml"),
        extra="forbid",
    )

    data_dir: Path = Field(Path("var"), description="Database file (embedded), keys, broker logs.")
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default: SQLite file in data_dir."
    )
    kafka_bootstrap: str | None = Field(
        None, description="host:port of a Kafka cluster; default: start the embedded broker."
    )
    embedded_broker_port: int = Field(0, description="0 picks a free loopback port.")
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    mllp_tls_cert: Path | None = Field(
        None, description="PEM certificate chain: with mllp_tls_key, MLLP is served over TLS."
    )
    mllp_tls_key: Path | None = Field(None, description="PEM private key of mllp_tls_cert.")
    mllp_tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: when set, clients must present a certificate (mTLS)."
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    directory_file: Path | None = Field(
        None, description="Directory of recipients (TOML); default: the bundled demo directory."
    )
    routing_file: Path | None = Field(
        None, description="Routing rules (TOML); default: mappings/routing/lus.toml."
    )
    source_system: str = Field(
        "", description="Overrides the sender identity taken from MSH-3/MSH-4 (tests, proxies)."
    )
    reconcile_after_seconds: float = Field(
        30.0, description="Republish work that has not advanced for this long."
    )
    reconcile_interval_seconds: float = 5.0
    relay_poll_seconds: float = 0.2
    consumer_fetch_wait_ms: int = 20
    consumer_session_timeout_ms: int | None = Field(
        None,
        description="Kafka consumer session; default 3000 on the embedded broker (it answers a "
        "join after half of it), 10000 on Kafka (whose minimum is 6000 by default).",
    )
    retention_days: float = Field(
        7.0, description="Keep published outbox rows and processed-event keys this long."
    )
    max_attempts: int = Field(3, description="Handler attempts before an event is parked.")
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the TOML file; explicit arguments beat both.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'brygga.db').resolve()}"

    def mllp_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the MLLP listener, or None for plain TCP."""
        if not (self.mllp_tls_cert and self.mllp_tls_key):
            if self.mllp_tls_cert or self.mllp_tls_key or self.mllp_tls_client_ca:
                raise ValueError("MLLP TLS needs both BRYGGA_MLLP_TLS_CERT and _KEY")
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.mllp_tls_cert, self.mllp_tls_key)
        if self.mllp_tls_client_ca:
            context.load_verify_locations(self.mllp_tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"
