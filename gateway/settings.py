"""Settings: environment variables prefixed ``BRYGGA_``, an optional TOML file, safe defaults.

The defaults are the embedded mode: SQLite under ``./var/``, a Kafka-protocol broker the
gateway starts itself on loopback, listeners bound to loopback only.
"""

from __future__ import annotations

import os
import ssl
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ALL_STAGES = (
    "intake",
    "consent",
    "route",
    "deliver",
    "receipts",
    "relay",
    "reconcile",
    "followup",
    "api",
)


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
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How the gateway talks to Kafka; SASL_SSL in production."
    )
    kafka_ssl_cafile: Path | None = Field(
        None, description="PEM CA bundle that signed the brokers' certificates (SSL, SASL_SSL)."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="PEM client certificate, when the brokers want one (mTLS)."
    )
    kafka_ssl_keyfile: Path | None = Field(
        None, description="PEM private key of kafka_ssl_certfile."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_PLAINTEXT, SASL_SSL)."
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_idempotence: bool = Field(
        False,
        description="Idempotent producer (acks=all either way). On for Apache Kafka; the "
        "embedded broker cannot.",
    )
    kafka_topic_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to every topic and consumer group name (several gateways on "
        "one cluster); the same value as TOPIC_PREFIX of deploy/kafka-topics.sh.",
    )
    kafka_create_topics: bool = Field(
        True,
        description="Create missing topics at start (the embedded broker). Off where "
        "deploy/kafka-topics.sh made them with their replication: the gateway then waits "
        "for them.",
    )
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    mllp_tls_cert: Path | None = Field(
        None, description="PEM certificate chain: with mllp_tls_key, MLLP is served over TLS."
    )
    mllp_tls_key: Path | None = Field(None, description="PEM private key of mllp_tls_cert.")
    mllp_tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: when set, clients must present a certificate (mTLS)."
    )
    mllp_max_frame: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest MLLP frame (bytes); larger ones get AR."
    )
    mllp_max_pending: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Bytes all connections together may hold in unfinished frames; a frame "
        "that would pass it is refused (AR) and its connection closed.",
    )
    mllp_idle_timeout: float = Field(
        300, gt=0, description="Seconds a connection may stay silent before it is closed."
    )
    mllp_frame_timeout: float = Field(
        60, gt=0, description="Seconds from a frame's first byte to its end before closing."
    )
    mllp_max_connections: int = Field(
        512, gt=0, description="Concurrent MLLP connections; more are closed at once."
    )
    mllp_parse_inline_max: int = Field(
        64 * 1024,
        ge=0,
        description="Messages larger than this (bytes) are parsed in a worker thread, off "
        "the event loop.",
    )
    mllp_parse_timeout: float = Field(
        10, gt=0, description="Seconds a message may take to parse and map before AR."
    )
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    public_base_url: str | None = Field(
        None,
        description="The gateway's HTTP address as recipients reach it (e.g. "
        "https://brygga.region.se); MessageHeader.source.endpoint is it + /fhir. Default: "
        "http(s)://http_host:http_port.",
    )
    http_max_body_bytes: int = Field(
        5 * 1024 * 1024, ge=1, description="Larger HTTP request bodies are refused with 413."
    )
    http_tls_cert: Path | None = Field(
        None, description="PEM certificate chain: with http_tls_key, HTTP is served as HTTPS."
    )
    http_tls_key: Path | None = Field(None, description="PEM private key of http_tls_cert.")
    http_tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: when set, HTTPS clients must present a certificate."
    )
    directory_file: Path | None = Field(
        None,
        description="Directory of recipients (TOML, or a FHIR Bundle .json) that seeds the "
        "directory store when it is empty; default: the bundled demo directory.",
    )
    deadlines_file: Path | None = Field(
        None,
        description="LUS clocks and municipal overrides (TOML); default: "
        "mappings/deadlines/lus.toml.",
    )
    routing_file: Path | None = Field(
        None, description="Routing rules (TOML); default: mappings/routing/lus.toml."
    )
    residence_lookup: str = Field(
        "table",
        description="Where the patient's municipality and district come from when routing "
        "(decision 0016): 'table' (PID-11's municipality code, else the postcode table), or "
        "the name of an entry point in the group brygga.residence (a population-register "
        "client).",
    )
    postcodes_file: Path | None = Field(
        None,
        description="Postcode -> municipality and district (TOML) for the 'table' lookup; "
        "default: mappings/geography/postcodes.toml (example data).",
    )
    source_system: str = Field(
        "", description="Overrides the sender identity taken from MSH-3/MSH-4 (tests, proxies)."
    )
    takecare_sender: str = Field(
        "",
        description="MSH-4 for TakeCare messages that leave it empty (it is optional in HL7):"
        " the HSA-id, or a unit code of mappings/takecare/facilities.toml, of the facility"
        " this connection serves. Empty: such messages get AE 101 naming MSH-4.",
    )
    takecare_lus_marker: Literal["optional", "required"] = Field(
        "optional",
        description="How this TakeCare connection marks LUS cases (ZLU segment, decision"
        " 0017). optional: the feed carries only LUS cases; a message without ZLU is one,"
        " with both needs. required: the feed carries every admission; only a stay a ZLU"
        " marks as needing support is a LUS case, the rest end as not-lus.",
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
    resend_after_minutes: float = Field(
        30.0, gt=0, description="Resend a delivery without an application receipt after this."
    )
    max_resends: int = Field(
        2, ge=0, description="Resends on one channel before falling back to the next."
    )
    followup_interval_seconds: float = Field(
        5.0, gt=0, description="How often follow-up looks for resends, fallbacks, deadlines."
    )
    audit_checkpoint_every: int = Field(
        1000, ge=1, description="Sign an audit checkpoint once this many entries are uncovered…"
    )
    audit_checkpoint_seconds: float = Field(
        300.0, gt=0, description="…or once the oldest uncovered audit entry is this old."
    )
    kek: SecretStr | None = Field(
        None,
        description="Key-encryption key: base64 of 32 random bytes. Several, separated by "
        "commas: the first wraps new data keys, the others stay readable during a KEK "
        "rotation. Default: the file kek_file, created on first start.",
    )
    kek_file: Path | None = Field(
        None, description="The KEK file (one base64 key per line); default data_dir/keys/kek.key."
    )
    kek_provider: str = Field(
        "local",
        description="'local' (BRYGGA_KEK or the KEK file), or the name of an entry point in "
        "the group brygga.kek (a KMS).",
    )
    key_cache_seconds: float = Field(
        5.0,
        description="A process looks up the active data key again after this long: within it "
        "of `brygga keys rotate`, every process encrypts with the new key.",
    )
    read_plaintext_rows: bool = Field(
        True,
        description="Read rows stored before encryption (schema 0004) as they are. Turn off "
        "once `brygga keys reencrypt` has encrypted them.",
    )
    log_level: str = "info"
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The asyncio event loop: uvloop (libuv; about a quarter less CPU per "
        "message on the accept path) or Python's own. Falls back to asyncio where uvloop "
        "is not installed.",
    )

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
        if not _tls_files("MLLP", self.mllp_tls_cert, self.mllp_tls_key, self.mllp_tls_client_ca):
            return None
        assert self.mllp_tls_cert and self.mllp_tls_key
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.mllp_tls_cert, self.mllp_tls_key)
        if self.mllp_tls_client_ca:
            context.load_verify_locations(self.mllp_tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def http_tls(self) -> dict[str, Any]:
        """uvicorn's TLS options for the API ({} for plain HTTP)."""
        if not _tls_files("HTTP", self.http_tls_cert, self.http_tls_key, self.http_tls_client_ca):
            return {}
        options: dict[str, Any] = {
            "ssl_certfile": str(self.http_tls_cert),
            "ssl_keyfile": str(self.http_tls_key),
        }
        if self.http_tls_client_ca:
            options["ssl_ca_certs"] = str(self.http_tls_client_ca)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options

    @property
    def http_scheme(self) -> str:
        return "https" if self.http_tls_cert else "http"

    @property
    def fhir_endpoint(self) -> str:
        """MessageHeader.source.endpoint: the FHIR base that answers ($process-message)."""
        base = self.public_base_url or f"{self.http_scheme}://{self.http_host}:{self.http_port}"
        return base.rstrip("/") + "/fhir"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"


def _tls_files(what: str, cert: Path | None, key: Path | None, client_ca: Path | None) -> bool:
    """Whether TLS is configured; a half configuration is an error that says what is missing."""
    if cert and key:
        return True
    if cert or key or client_ca:
        raise ValueError(f"{what} TLS needs both BRYGGA_{what}_TLS_CERT and BRYGGA_{what}_TLS_KEY")
    return False
