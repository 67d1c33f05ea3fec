"""The HTTP API in-process against a real database: auth, scoping, errors, OpenAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.store.db import Database, migrate
from tests.inprocess import HOME_CARE, Pipeline, canonical

OTHER_HOME_CARE = "SE5561234567-HT02"


@pytest.fixture
async def env(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys, Pipeline]]:
    await migrate(database_url)
    db = Database(database_url)
    keys = TokenKeys.from_dir(tmp_path / "keys")
    waiting: list[str] = []
    app = create_app(db, keys, lambda: waiting)
    app.state.waiting = waiting
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, keys, Pipeline(db)
    await db.close()


def bearer(keys: TokenKeys, org: str = HOME_CARE, role: str = "staff") -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue(org, role, "Anna Svensson")}


async def test_inbox_requires_a_valid_token(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = env
    r = await client.get("/api/v1/inbox")
    assert r.status_code == 401 and "brygga token" in r.json()["detail"]
    stranger = TokenKeys(Ed25519PrivateKey.generate()).issue(HOME_CARE, "staff")
    r = await client.get("/api/v1/inbox", headers={"Authorization": f"Bearer {stranger}"})
    assert r.status_code == 401 and "signature" in r.json()["detail"]
    r = await client.get("/api/v1/inbox", headers=bearer(keys, role="ops"))
    assert r.status_code == 403 and "staff" in r.json()["detail"]
    r = await client.get("/api/v1/messages/x", headers=bearer(keys))
    assert r.status_code == 403


async def test_notices_are_scoped_to_the_callers_organisation(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, pipeline = env
    mid = await pipeline.run(canonical(1), "C-1")
    items = (await client.get("/api/v1/inbox", headers=bearer(keys))).json()
    assert [i["message_id"] for i in items] == [mid]
    notice_id = items[0]["id"]
    # Another provider neither sees it nor can open or acknowledge it.
    other = bearer(keys, OTHER_HOME_CARE)
    assert (await client.get("/api/v1/inbox", headers=other)).json() == []
    assert (await client.get(f"/api/v1/inbox/{notice_id}", headers=other)).status_code == 404
    r = await client.post(
        f"/api/v1/inbox/{notice_id}/acknowledge", headers=other, json={"name": "X", "role": "Y"}
    )
    assert r.status_code == 404
    # Acknowledging needs a name and a role.
    r = await client.post(
        f"/api/v1/inbox/{notice_id}/acknowledge",
        headers=bearer(keys),
        json={"name": "", "role": "Undersköterska"},
    )
    assert r.status_code == 422
    # The ledger shows the failed delivery to a party missing from the directory.
    ledger = (
        await client.get(
            f"/api/v1/messages/{mid}", headers=bearer(keys, "SE2321000016-OPS1", "ops")
        )
    ).json()
    failed = [d for d in ledger["deliveries"] if d["state"] == "failed"]
    assert [d["recipient"]["hsa_id"] for d in failed] == ["SE9999999999-NONE"]
    assert "katalogen" in failed[0]["receipts"][-1]["detail"]
    r = await client.get("/api/v1/messages/nope", headers=bearer(keys, "SE2321000016-OPS1", "ops"))
    assert r.status_code == 404


async def test_protected_identity_is_not_listed_by_name(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, pipeline = env
    await pipeline.run(canonical(2, protected=True, family="Skyddadsson"), "C-2")
    listed = (await client.get("/api/v1/inbox", headers=bearer(keys))).text
    assert "Skyddadsson" not in listed and "Skyddad identitet" in listed
    notice_id = (await client.get("/api/v1/inbox", headers=bearer(keys))).json()[0]["id"]
    opened = (await client.get(f"/api/v1/inbox/{notice_id}", headers=bearer(keys))).json()
    assert opened["patient"]["name"] == "Tolvan Skyddadsson"


async def test_no_consent_holds_and_objection_denies(env) -> None:  # type: ignore[no-untyped-def]
    _client, _keys, pipeline = env
    held = await pipeline.run(canonical(3, consent=None), "C-3")
    denied = await pipeline.run(canonical(4, consent="sparr"), "C-4")
    allowed = await pipeline.run(canonical(5, consent="menprovning"), "C-5")
    assert await pipeline.status(held) == "held"
    assert await pipeline.status(denied) == "denied"
    assert await pipeline.status(allowed) == "routed"


async def test_readiness_and_openapi(env) -> None:  # type: ignore[no-untyped-def]
    client, _keys, _ = env
    assert (await client.get("/readyz")).status_code == 200
    client._transport.app.state.waiting.append("stage:consent")  # type: ignore[attr-defined]
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["waiting_for"] == ["stage:consent"]
    spec = (await client.get("/openapi.json")).json()
    for path in (
        "/api/v1/inbox",
        "/api/v1/inbox/{notice_id}",
        "/api/v1/inbox/{notice_id}/acknowledge",
        "/api/v1/messages/{message_id}",
    ):
        for op in spec["paths"][path].values():
            assert op["summary"]
            assert "example" in op["responses"]["200"]["content"]["application/json"], path
