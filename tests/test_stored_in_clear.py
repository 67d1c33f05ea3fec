"""Nothing a message says is stored in clear: after a message names a care party the
directory does not know (ROL-4), and that delivery fails and escalates, no text column of
any table holds the party's name; an audit search cannot store an identity number as its
purpose. PostgreSQL: every text, varchar and json column of the schema is scanned.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.model.bundle import CareParty
from gateway.store.db import Database
from tests.inprocess import HOME_CARE, KEYER, Pipeline, canonical
from tests.support import personnummer

UNKNOWN_NAME = "Vårdhemmet Zyxwvu Qjälp"
FAMILY = "Xqzwertsson"


async def _columns_holding(db: Database, needle: str) -> list[str]:
    """``table.column`` of every text-like column in which ``needle`` occurs."""
    async with db.read() as conn:
        columns = (
            await conn.execute(
                text(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND data_type IN "
                    "('text', 'character varying', 'character', 'json', 'jsonb')"
                )
            )
        ).all()
        found = []
        for table, column in columns:
            hits = await conn.execute(
                text(f'SELECT count(*) FROM "{table}" WHERE "{column}"::text LIKE :n'),
                {"n": f"%{needle}%"},
            )
            if hits.scalar_one():
                found.append(f"{table}.{column}")
    return found


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_party_unknown_to_the_directory_is_not_named_in_clear(db: Database) -> None:
    pipeline = Pipeline(db)
    parties = [
        CareParty("hemtjanst", HOME_CARE, "HT"),
        CareParty("rehab", "SE9999999999-NONE", UNKNOWN_NAME),
    ]
    mid = await pipeline.run(canonical(61, family=FAMILY, parties=parties), "CLEAR-1")
    await pipeline.follow_up()  # the failed delivery escalates: deviation, receipts
    async with db.read() as conn:
        summaries = (await conn.execute(text("SELECT summary FROM deviations"))).scalars().all()
        names = (
            await conn.execute(
                text("SELECT recipient_name FROM deliveries WHERE message_id = :m"), {"m": mid}
            )
        ).scalars().all()
    assert any("SE9999999999-NONE" in s for s in summaries), summaries  # it did escalate
    assert "SE9999999999-NONE" in names
    assert await _columns_holding(db, "Zyxwvu") == []
    assert await _columns_holding(db, FAMILY) == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_audit_purpose_holding_an_identity_number_is_refused(
    db: Database, tmp_path: Path
) -> None:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, list, KEYER)
    auditor = {"Authorization": "Bearer " + keys.issue(HOME_CARE, "auditor", "Revisor")}
    pnr = personnummer(62)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for purpose in (pnr, f"fraga-{pnr[:8]}-{pnr[8:]}", f"x.{pnr[2:]}"):
            r = await client.post(
                "/api/v1/audit/search", json={"patient": pnr, "purpose": purpose}, headers=auditor
            )
            assert r.status_code == 422, r.text
            assert "purpose must not contain a personal identity number" in r.text
            assert pnr[2:8] not in r.text
        ok = await client.post(
            "/api/v1/audit/search",
            json={"patient": pnr, "purpose": "patientens-begaran"},
            headers=auditor,
        )
        assert ok.status_code == 200, ok.text
    assert await _columns_holding(db, pnr[2:]) == []
