"""The HTTP API in-process against a real database: auth, scoping, errors, OpenAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.model.bundle import CONSENT_BASIS_SYSTEM
from gateway.store.db import Database
from gateway.store.tables import audit_log, messages
from tests.inprocess import HOME_CARE, KEYER, Pipeline, canonical
from tests.support import personnummer

OTHER_HOME_CARE = "SE5561234567-HT02"


@pytest.fixture
async def env(
    db: Database, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys, Pipeline]]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    waiting: list[str] = []
    app = create_app(db, keys, lambda: waiting, KEYER)
    app.state.waiting = waiting
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, keys, Pipeline(db)


def bearer(
    keys: TokenKeys, org: str = HOME_CARE, role: str = "staff", title: str = "Undersköterska"
) -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue(org, role, "Anna Svensson", title)}


async def test_inbox_requires_a_valid_token(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = env
    r = await client.get("/api/v1/inbox")
    assert r.status_code == 401 and "brygga token" in r.json()["detail"]
    stranger = TokenKeys(Ed25519PrivateKey.generate()).issue(HOME_CARE, "staff", "Anna Svensson")
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
    r = await client.post(f"/api/v1/inbox/{notice_id}/acknowledge", headers=other)
    assert r.status_code == 404
    # The kvittens is signed by the token's person: a name in the body is ignored.
    r = await client.post(
        f"/api/v1/inbox/{notice_id}/acknowledge",
        headers=bearer(keys),
        json={"name": "Dr. Nobody", "role": "Överläkare"},
    )
    assert r.status_code == 200, r.text
    signed = [x["by"] for x in r.json()["receipts"] if x["state"] == "acknowledged"]
    assert signed == [{"name": "Anna Svensson", "role": "Undersköterska"}]
    assert "Nobody" not in r.text and "Överläkare" not in r.text
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
        "/api/v1/audit/search",
    ):
        for op in spec["paths"][path].values():
            assert op["summary"]
            assert "example" in op["responses"]["200"]["content"]["application/json"], path


# --------------------------------------------------------------------------- FHIR Consent

PNR_SYSTEM = "http://electronichealth.se/identifier/personnummer"


def consent_resource(pnr: str, **changes: object) -> dict[str, object]:
    resource: dict[str, object] = {
        "resourceType": "Consent",
        "status": "active",
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "samtycke"}]}],
        "patient": {"identifier": {"system": PNR_SYSTEM, "value": pnr}},
        "provision": {"type": "permit"},
    }
    resource.update(changes)
    return resource


async def test_fhir_consent_create_read_search_withdraw(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, pipeline = env
    pnr = personnummer(90)
    hospital = bearer(keys, "SE2321000016-H001", "integration")
    # A notice held for want of consent, released by the POST. (The rehab unit the message
    # names is not in the directory: that delivery failed and stays failed.)
    mid = await pipeline.route_message(canonical(90, consent=None), "API-C1")

    async def states() -> set[str]:
        return set((await pipeline.states(mid)).values()) - {"failed"}

    assert await states() == {"held"}

    created = await client.post("/fhir/Consent", json=consent_resource(pnr), headers=hospital)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["meta"]["versionId"] == "1" and body["status"] == "active"
    assert created.headers["location"] == f"/fhir/Consent/{body['id']}/_history/1"
    assert await states() == {"routed"}

    read = await client.get(f"/fhir/Consent/{body['id']}", headers=bearer(keys, role="ops"))
    assert read.status_code == 200 and read.json() == body
    found = await client.get(
        "/fhir/Consent", params={"patient:identifier": f"{PNR_SYSTEM}|{pnr}"}, headers=hospital
    )
    assert found.json()["total"] == 1 and found.json()["entry"][0]["resource"]["id"] == body["id"]
    # a searchset's fullUrl is absolute (R4 Bundle.entry.fullUrl), on the base the caller used
    base = str(client.base_url).rstrip("/")
    assert found.json()["entry"][0]["fullUrl"] == f"{base}/fhir/Consent/{body['id']}"

    withdrawn = await client.put(
        f"/fhir/Consent/{body['id']}", json={**body, "status": "inactive"}, headers=hospital
    )
    assert withdrawn.status_code == 200 and withdrawn.json()["meta"]["versionId"] == "2"
    await pipeline.deliver_routed(mid)
    assert await states() == {"denied"}


async def test_fhir_consent_errors_are_operation_outcomes(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = env
    pnr = personnummer(91)
    hospital = bearer(keys, "SE2321000016-H001", "integration")
    bad_digit = pnr[:-1] + str((int(pnr[-1]) + 1) % 10)
    cases = [
        (
            client.post("/fhir/Consent", json=consent_resource(bad_digit), headers=hospital),
            400,
            "Consent.patient.identifier.value",
        ),
        (
            client.post("/fhir/Consent", json={"resourceType": "Consent"}, headers=hospital),
            400,
            "Consent.status",
        ),
        (
            client.post(
                "/fhir/Consent",
                content=b"not json",
                headers={**hospital, "Content-Type": "application/json"},
            ),
            400,
            None,
        ),
        (client.post("/fhir/Consent", json=consent_resource(pnr), headers=bearer(keys)), 403, None),
        (client.post("/fhir/Consent", json=consent_resource(pnr)), 401, None),
        (
            client.get("/fhir/Consent/00000000-0000-4000-8000-000000000000", headers=hospital),
            404,
            "Consent.id",
        ),
        (
            client.put(
                "/fhir/Consent/00000000-0000-4000-8000-000000000001",
                json={**consent_resource(pnr), "id": "another"},
                headers=hospital,
            ),
            400,
            "Consent.id",
        ),
        (
            client.get("/fhir/Consent", params={"patient:identifier": "urn:x|1"}, headers=hospital),
            400,
            "patient:identifier",
        ),
    ]
    for request, code, expression in cases:
        response = await request
        assert response.status_code == code, response.text
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome", outcome
        issue = outcome["issue"][0]
        assert issue["severity"] == "error" and issue["diagnostics"]
        if expression:
            assert issue["expression"] == [expression]
        assert bad_digit not in response.text and pnr not in response.text


async def test_fhir_consent_is_documented_with_examples(env) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = env
    spec = (await client.get("/openapi.json")).json()
    post = spec["paths"]["/fhir/Consent"]["post"]
    assert (
        post["requestBody"]["content"]["application/json"]["examples"]["samtycke"]["value"][
            "resourceType"
        ]
        == "Consent"
    )
    assert "example" in post["responses"]["201"]["content"]["application/fhir+json"]
    assert "400" in post["responses"] and "403" in post["responses"]
    put = spec["paths"]["/fhir/Consent/{consent_id}"]["put"]
    assert "återkallat" in put["requestBody"]["content"]["application/json"]["examples"]


OPS = "SE2321000016-OPS1"
AUDITORS = "SE2321000016-AUD1"


async def _audit_rows(pipeline: Pipeline) -> list[Any]:
    async with pipeline.db.read() as conn:
        return list((await conn.execute(select(audit_log).order_by(audit_log.c.seq))).all())


async def test_reads_are_audited_with_the_callers_org_and_role(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, pipeline = env
    mid = await pipeline.run(canonical(7, family="Loggsson"), "C-7")
    async with pipeline.db.read() as conn:
        key = (
            await conn.execute(select(messages.c.patient_key).where(messages.c.id == mid))
        ).scalar_one()
    delivered = [r for r in await _audit_rows(pipeline) if r.action == "delivery.delivered"]
    assert delivered and {(r.actor, r.role, r.patient_key) for r in delivered} == {
        ("deliver", "system", key)
    }
    assert any(HOME_CARE in r.detail for r in delivered)

    notice_id = (await client.get("/api/v1/inbox", headers=bearer(keys))).json()[0]["id"]
    await client.get(f"/api/v1/inbox/{notice_id}", headers=bearer(keys))
    body = {"name": "Bo Berg", "role": "Sjuksköterska"}  # ignored: the token signs
    await client.post(
        f"/api/v1/inbox/{notice_id}/acknowledge",
        headers=bearer(keys, title="Sjuksköterska"),
        json=body,
    )
    await client.get(f"/api/v1/messages/{mid}", headers=bearer(keys, OPS, "ops"))
    # Refused and unknown reads show nothing, so they record nothing.
    await client.get(f"/api/v1/inbox/{notice_id}", headers=bearer(keys, "SE5561234567-HT02"))
    await client.get("/api/v1/messages/nope", headers=bearer(keys, OPS, "ops"))

    rows = await _audit_rows(pipeline)
    reads = [
        (r.action, r.actor, r.actor_org, r.role, r.purpose, r.patient_key, r.subject)
        for r in rows
        if not r.action.startswith(("delivery.", "gate."))
    ]
    assert reads == [
        ("inbox.list", "Anna Svensson", HOME_CARE, "staff", "lus-utskrivning", key, notice_id),
        ("message.read", "Anna Svensson", HOME_CARE, "staff", "lus-utskrivning", key, notice_id),
        (
            "message.acknowledge",
            "Anna Svensson",
            HOME_CARE,
            "staff",
            "lus-utskrivning",
            key,
            notice_id,
        ),
        ("message.ledger", "Anna Svensson", OPS, "ops", "drift", key, mid),
    ]
    assert rows[-2].detail == "kvitterat av Anna Svensson (Sjuksköterska)"
    # No identity number or name of the patient anywhere in the audit table.
    dump = repr([tuple(r) for r in rows])
    pnr = personnummer(7)
    for spelling in (pnr, pnr[2:], f"{pnr[:8]}-{pnr[8:]}", f"{pnr[2:8]}-{pnr[8:]}", "Loggsson"):
        assert spelling not in dump


async def test_only_auditors_search_the_audit_trail(env) -> None:  # type: ignore[no-untyped-def]
    client, keys, pipeline = env
    await pipeline.run(canonical(8), "C-8")
    pnr = personnummer(8)
    for role in ("staff", "ops", "integration"):
        r = await client.post(
            "/api/v1/audit/search", headers=bearer(keys, AUDITORS, role), json={"patient": pnr}
        )
        assert r.status_code == 403 and "auditor" in r.json()["detail"]
    auditor = bearer(keys, AUDITORS, "auditor")
    r = await client.post(
        "/api/v1/audit/search",
        headers=auditor,
        json={"patient": f"{pnr[:8]}-{pnr[8:]}", "purpose": "patientens-begaran"},
    )
    assert r.status_code == 200 and pnr not in r.text and pnr[2:] not in r.text
    answer = r.json()
    assert answer["entries"] and not answer["truncated"]
    assert {e["action"] for e in answer["entries"]} == {"gate.decision", "delivery.delivered"}
    # The search is itself recorded; a second search finds the first.
    again = (
        await client.post("/api/v1/audit/search", headers=auditor, json={"patient": pnr})
    ).json()
    last = again["entries"][-1]
    assert (last["action"], last["role"], last["actor_org"], last["purpose"]) == (
        "audit.read",
        "auditor",
        AUDITORS,
        "patientens-begaran",
    )
    # Another patient has no entries; an invalid number is refused without being repeated.
    other = (
        await client.post(
            "/api/v1/audit/search", headers=auditor, json={"patient": personnummer(9)}
        )
    ).json()
    assert other["entries"] == [] and other["patient_key"] != answer["patient_key"]
    bad = pnr[:-1] + str((int(pnr[-1]) + 1) % 10)
    r = await client.post("/api/v1/audit/search", headers=auditor, json={"patient": bad})
    assert r.status_code == 422 and "Luhn" in r.text and bad not in r.text
