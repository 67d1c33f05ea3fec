"""What real feeds send, over a real MLLP socket into a real database: a local ward code and
an unmapped MSH-4 are accepted and listed for operators; a message without MSH-4 takes the
connection's configured sender. And the list as the API serves it, to whom."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
import structlog
from sqlalchemy import select

from adapters.hl7v2.render import render
from adapters.takecare import mllp
from adapters.takecare.ack import parse_ack
from adapters.takecare.receipts import ReceiptsToTakeCare, TakeCareReceiptsPlugin
from adapters.takecare.source import TakeCareSource
from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.model.bundle import read_bundle, to_bundle
from gateway.pipeline.intake import Intake
from gateway.settings import Settings
from gateway.sources import SourceContext
from gateway.store import unmapped
from gateway.store.db import Database
from gateway.store.tables import messages
from mappings import MAPPINGS_DIR
from tests.inprocess import HOME_CARE, KEYER, canonical

ADMISSION = (MAPPINGS_DIR / "takecare" / "golden" / "adt_a01_full.hl7").read_bytes()
FACILITY = b"SE2321000016-EX01^1.2.752.29.4.19^ISO"
WARD = b"SE2321000016-EX12^^^SE2321000016-EX01"
SENDER = "SE2321000016-EX01"


def _message(control_id: str, *, facility: bytes = FACILITY, ward: bytes = WARD) -> bytes:
    raw = ADMISSION.replace(b"TC20250310-0001", control_id.encode())
    return raw.replace(b"|" + FACILITY + b"|", b"|" + facility + b"|", 1).replace(
        b"|" + WARD + b"|", b"|" + ward + b"|", 1
    )


@pytest.fixture
async def source(db: Database, tmp_path: Path) -> AsyncIterator[tuple[TakeCareSource, int]]:
    settings = Settings(data_dir=tmp_path, mllp_port=0, takecare_sender=SENDER)
    src = TakeCareSource()
    await src.start(SourceContext(settings=settings, intake=Intake(db, KEYER)))
    assert src._server is not None
    yield src, src._server.sockets[0].getsockname()[1]
    await src.stop()


async def _send(port: int, *raws: bytes) -> list[tuple[str, str]]:
    acks = await mllp.send("127.0.0.1", port, list(raws), timeout=20)
    return [parse_ack(a)[:2] for a in acks]


async def test_local_codes_are_accepted_counted_and_logged_once(
    source: tuple[TakeCareSource, int], db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = source
    # the module's own logger, captured: capture_logs() misses a logger another test already
    # cached (gateway.logs.configure caches loggers on first use)
    capture = structlog.testing.LogCapture()
    monkeypatch.setattr(unmapped, "log", structlog.wrap_logger(None, processors=[capture]))
    logs = capture.entries
    answers = await _send(
        port,
        _message("UC-1", ward=b"GER 12^^^SE2321000016-EX01"),
        _message("UC-2", ward=b"GER 12"),
        _message("UC-2", ward=b"GER 12"),  # a resend: the same message, counted once
        _message("UC-3", facility=b"TCKS", ward=b"G7"),
    )
    # MSH-15 AL: enhanced mode, the commit ACK is CA
    assert answers == [("CA", "UC-1"), ("CA", "UC-2"), ("CA", "UC-2"), ("CA", "UC-3")]
    async with db.read() as conn:
        rows = {(r["sender"], r["field"], r["code"]): r for r in await unmapped.listing(conn)}
        stored = (await conn.execute(select(messages.c.control_id, messages.c.canonical))).all()
    assert {k: r["count"] for k, r in rows.items()} == {
        (SENDER, "PV1-3", "GER 12"): 2,
        ("TCKS", "MSH-4", "TCKS"): 1,
        ("TCKS", "PV1-3", "G7"): 1,
    }
    first = rows[(SENDER, "PV1-3", "GER 12")]
    assert first["first_seen"] <= first["last_seen"]
    seen = [e for e in logs if e["event"] == "unmapped_code.first_seen"]
    assert sorted((e["sender"], e["field"], e["code"]) for e in seen) == sorted(rows)
    assert len({c for c, _ in stored}) == 3  # every message was kept
    assert stored and all(b is not None for _, b in stored)


async def test_missing_msh4_takes_the_configured_sender(
    source: tuple[TakeCareSource, int], db: Database
) -> None:
    _, port = source
    assert await _send(port, _message("NO-MSH4", facility=b"")) == [("CA", "NO-MSH4")]
    async with db.read() as conn:
        bundle = (
            await conn.execute(
                select(messages.c.canonical).where(messages.c.control_id == "NO-MSH4")
            )
        ).scalar_one()
        assert await unmapped.listing(conn) == []
    assert read_bundle(json.loads(bundle)).sender_hsa_id == SENDER


async def test_without_a_configured_sender_missing_msh4_is_ae_101(
    db: Database, tmp_path: Path
) -> None:
    src = TakeCareSource()
    await src.start(
        SourceContext(settings=Settings(data_dir=tmp_path, mllp_port=0), intake=Intake(db, KEYER))
    )
    try:
        assert src._server is not None
        port = src._server.sockets[0].getsockname()[1]
        ack = (await mllp.send("127.0.0.1", port, [_message("N4", facility=b"")], timeout=20))[0]
        code, control_id, location, _ = parse_ack(ack)
        assert (code, control_id) == ("CE", "N4") and "MSH" in str(location)
    finally:
        await src.stop()


# --------------------------------------------------------------------------- the API


@pytest.fixture
async def api(db: Database, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys]]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [], KEYER)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, keys


def _bearer(keys: TokenKeys, role: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue(SENDER, role, "Ola Drift", "Tekniker")}


async def test_api_lists_unmapped_codes_newest_first(
    api: tuple[httpx.AsyncClient, TokenKeys], db: Database
) -> None:
    client, keys = api
    t0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    async with db.transaction() as conn:
        assert await unmapped.record(conn, SENDER, [("PV1-3", "GER 12")], t0) == [
            ("PV1-3", "GER 12")
        ]
        later = t0 + timedelta(days=1)
        found = [("PV1-3", "GER 12"), ("PV1-3", "GER 12"), ("MSH-4", "TCKS")]
        assert await unmapped.record(conn, SENDER, found, later) == [("MSH-4", "TCKS")]
        await unmapped.record(conn, SENDER, [("PV1-3", "GER 12")], later + timedelta(hours=1))
    for role in ("ops", "directory-admin"):
        r = await client.get("/api/v1/ops/unmapped-codes", headers=_bearer(keys, role))
        assert r.status_code == 200, role
        codes: list[dict[str, Any]] = r.json()["codes"]
        assert [(c["field"], c["code"], c["count"]) for c in codes] == [
            ("PV1-3", "GER 12", 3),
            ("MSH-4", "TCKS", 1),
        ]
        assert datetime.fromisoformat(codes[0]["first_seen"]) == t0
        assert datetime.fromisoformat(codes[0]["last_seen"]) == later + timedelta(hours=1)
    for role in ("staff", "integration", "auditor", "consent-admin"):
        r = await client.get("/api/v1/ops/unmapped-codes", headers=_bearer(keys, role))
        assert r.status_code == 403, role
    assert (await client.get("/api/v1/ops/unmapped-codes")).status_code == 401
    spec = (await client.get("/openapi.json")).json()["paths"]["/api/v1/ops/unmapped-codes"]
    assert spec["get"]["responses"]["200"]["content"]["application/json"]["example"]["codes"]


# --------------------------------------------------------------------------- outbound


def test_outbound_pv1_3_falls_back_to_the_sender_for_a_local_ward_code() -> None:
    """A local ward code means nothing to the receiver of the HL7 v2 notice: PV1-3.1
    carries the sending facility's HSA-id instead (an HSA-id ward is sent as it is)."""
    local = replace(canonical(1), ward_hsa_id="", ward_code="GER 12")
    parsed = hl7.parse(render(to_bundle(local, "m"), "C1", HOME_CARE))
    assert str(parsed["PV1.F3.R1.C1"]) == local.sender_hsa_id
    assert "GER 12" not in str(parsed)
    ward = replace(canonical(1), ward_hsa_id="SE2321000016-EX12")
    parsed = hl7.parse(render(to_bundle(ward, "m"), "C1", HOME_CARE))
    assert str(parsed["PV1.F3.R1.C1"]) == "SE2321000016-EX12"


def test_receipts_reread_a_message_with_the_configured_sender(db: Database) -> None:
    """The application ACKs back to TakeCare parse the stored message again: with the
    same fallback for an empty MSH-4, or a message accepted that way would get none."""
    plugin = TakeCareReceiptsPlugin()
    plugin.enabled(Settings(takecare_sender=SENDER))
    stage = plugin.stage(db)
    assert isinstance(stage, ReceiptsToTakeCare) and stage.default_sender == SENDER
