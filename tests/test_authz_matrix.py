"""The authorisation matrix: every endpoint x every role x own and other organisation, and
every endpoint x every kind of bad token, against one table (docs/operations.md, "Who may
do what"). The endpoints are read from the app itself: one missing from the table fails.

"Own" means the token's organisation owns the resource the request is about (the message's
sender, the notice's recipient, the deviation's responsible party, the patient's sending care
unit, the directory unit); "other" is an unrelated organisation with the same role.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from gateway import clock
from gateway.api.app import create_app
from gateway.api.auth import ROLES, TokenKeys, TokenRefused
from gateway.api.policy import POLICY
from gateway.directory import store as directory_store
from gateway.directory.fhir import CONNECTION, KIND_SYSTEM
from gateway.keyfiles import ed25519_private_key
from gateway.model.bundle import CONSENT_BASIS_SYSTEM
from gateway.model.events import LUS_EVENT_SYSTEM
from gateway.model.identifiers import HSA_SYSTEM
from gateway.pipeline import deviations, inbox
from gateway.runtime import directory_path
from gateway.settings import Settings
from gateway.store.db import Database
from tests.inprocess import HOME_CARE, HOSPITAL, KEYER, Pipeline, canonical
from tests.support import personnummer

STRANGER = "SE5560001111-XX01"  # an organisation that owns nothing here
PNR_SYSTEM = "http://electronichealth.se/identifier/personnummer"
PERSON = "Matris Testperson"

OK, EMPTY, CREATED, GONE = "200", "200:empty", "201", "204"
FORBIDDEN, NOT_FOUND, UNAUTHORISED = "403", "404", "401"
ANYONE = "public"  # no token needed; tokens are not looked at


def row(**by_role: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """Expected (own, other) per role; a role not named is refused (403) for both."""
    names = {r.replace("_", "-"): v for r, v in by_role.items()}
    return {role: names.get(role, (FORBIDDEN, FORBIDDEN)) for role in sorted(ROLES)}


SAME = {
    "ok": (OK, OK),
    "created": (CREATED, CREATED),
    "gone": (GONE, GONE),
}

# (method, path) -> expected per role, or ANYONE. This mirrors docs/operations.md.
DIRECTORY_READ = row(directory_admin=SAME["ok"], integration=SAME["ok"], ops=SAME["ok"])
DIRECTORY_CREATE = row(directory_admin=SAME["created"], integration=(CREATED, FORBIDDEN))
DIRECTORY_DELETE = row(directory_admin=SAME["gone"], integration=(GONE, FORBIDDEN))
TABLE: dict[tuple[str, str], dict[str, tuple[str, str]] | str] = {
    ("GET", "/healthz"): ANYONE,
    ("GET", "/readyz"): ANYONE,
    ("GET", "/openapi.json"): ANYONE,
    ("GET", "/docs"): ANYONE,
    ("GET", "/docs/oauth2-redirect"): ANYONE,
    ("GET", "/redoc"): ANYONE,
    ("GET", "/api/v1/inbox"): row(staff=(OK, EMPTY)),
    ("GET", "/api/v1/inbox/{notice_id}"): row(staff=(OK, NOT_FOUND)),
    ("POST", "/api/v1/inbox/{notice_id}/acknowledge"): row(staff=(OK, NOT_FOUND)),
    ("POST", "/api/v1/inbox/{notice_id}/returns/{kind}"): row(staff=(CREATED, NOT_FOUND)),
    ("GET", "/api/v1/messages/{message_id}"): row(ops=SAME["ok"], integration=(OK, NOT_FOUND)),
    ("GET", "/api/v1/messages"): row(ops=SAME["ok"], integration=(OK, EMPTY)),
    ("POST", "/fhir/$process-message"): row(integration=(OK, FORBIDDEN)),
    ("GET", "/api/v1/deviations"): row(staff=(OK, EMPTY), ops=SAME["ok"], auditor=SAME["ok"]),
    ("GET", "/api/v1/deviations/{deviation_id}"): row(
        staff=(OK, NOT_FOUND), ops=SAME["ok"], auditor=SAME["ok"]
    ),
    ("GET", "/fhir/DetectedIssue/{deviation_id}"): row(
        staff=(OK, NOT_FOUND), ops=SAME["ok"], auditor=SAME["ok"]
    ),
    ("POST", "/api/v1/deviations/{deviation_id}/answer"): row(
        staff=(OK, NOT_FOUND), ops=SAME["ok"]
    ),
    ("POST", "/fhir/Consent"): row(integration=(CREATED, FORBIDDEN), consent_admin=SAME["created"]),
    ("PUT", "/fhir/Consent/{consent_id}"): row(
        integration=(CREATED, FORBIDDEN), consent_admin=SAME["created"]
    ),
    ("GET", "/fhir/Consent/{consent_id}"): row(
        integration=(OK, NOT_FOUND), consent_admin=SAME["ok"], ops=SAME["ok"], auditor=SAME["ok"]
    ),
    ("GET", "/fhir/Consent"): row(
        integration=(OK, FORBIDDEN), consent_admin=SAME["ok"], ops=SAME["ok"], auditor=SAME["ok"]
    ),
    ("GET", "/api/v1/stats"): row(ops=SAME["ok"], auditor=SAME["ok"]),
    ("GET", "/api/v1/ops/unmapped-codes"): row(ops=SAME["ok"], directory_admin=SAME["ok"]),
    ("POST", "/api/v1/audit/search"): row(auditor=SAME["ok"]),
}
for _type in ("Organization", "HealthcareService", "Endpoint"):
    TABLE[("GET", f"/fhir/{_type}")] = DIRECTORY_READ
    TABLE[("GET", f"/fhir/{_type}/{{rid}}")] = DIRECTORY_READ
    TABLE[("POST", f"/fhir/{_type}")] = DIRECTORY_CREATE
    TABLE[("PUT", f"/fhir/{_type}/{{rid}}")] = DIRECTORY_CREATE
    TABLE[("DELETE", f"/fhir/{_type}/{{rid}}")] = DIRECTORY_DELETE


def app_endpoints(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app answers: the OpenAPI paths and the routes themselves,
    those left out of the schema included."""
    found = {
        (method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops
    }

    def walk(routes: list[Any]) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:
                walk(inner.routes)
            elif hasattr(route, "path") and hasattr(route, "methods"):
                found.update((m, route.path) for m in route.methods if m != "HEAD")

    walk(app.routes)
    return found


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """What the requests are about, and who owns it."""

    db: Database
    backend: str = "sqlite"
    message_id: str = ""
    control_id: str = "MTX-1"
    notice_id: str = ""
    deviation_id: str = ""
    consent_id: str = ""
    pnr: str = field(default_factory=lambda: personnummer(1))
    n: int = 0

    def next(self) -> int:
        self.n += 1
        return self.n


@dataclass
class Req:
    method: str
    url: str
    owner: str
    json: Any = None
    params: dict[str, str] | None = None


def consent_resource(pnr: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "samtycke"}]}],
        "patient": {"identifier": {"system": PNR_SYSTEM, "value": pnr}},
        "provision": {"type": "permit"},
    }


def _org(hsa: str) -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "identifier": [{"system": HSA_SYSTEM, "value": hsa}],
        "type": [{"coding": [{"system": KIND_SYSTEM, "code": "home-care"}]}],
        "name": "Matrisens hemtjänst",
    }


def _endpoint(org_id: str) -> dict[str, Any]:
    system, code = CONNECTION["fax"]
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {"system": system, "code": code},
        "managingOrganization": {"reference": f"Organization/{org_id}"},
        "payloadType": [{"text": "LUS"}],
        "address": "tel:+4681234567",
    }


def _service(org_id: str) -> dict[str, Any]:
    return {
        "resourceType": "HealthcareService",
        "providedBy": {"reference": f"Organization/{org_id}"},
        "name": "Matrisens hemtjänst",
    }


async def _fresh_unit(world: World) -> tuple[str, str]:
    """A new unit in the directory: (its HSA-id, its Organization id)."""
    n = world.next()
    hsa, org_id = f"SE{5569990000 + n}-M{n}", f"mtx-org-{n}"
    async with world.db.transaction() as conn:
        await directory_store.save(conn, "Organization", org_id, {**_org(hsa), "id": org_id})
    return hsa, org_id


def _directory_builders(rtype: str) -> dict[tuple[str, str], Callable[[World], Awaitable[Req]]]:
    base = f"/fhir/{rtype}"

    async def body(world: World) -> tuple[str, dict[str, Any]]:
        if rtype == "Organization":
            n = world.next()
            hsa = f"SE{5568880000 + n}-N{n}"
            return hsa, _org(hsa)
        hsa, org_id = await _fresh_unit(world)
        return hsa, (_endpoint(org_id) if rtype == "Endpoint" else _service(org_id))

    async def existing(world: World) -> tuple[str, str]:
        hsa, resource = await body(world)
        rid = f"mtx-{rtype.lower()}-{world.next()}"
        async with world.db.transaction() as conn:
            await directory_store.save(conn, rtype, rid, {**resource, "id": rid})
        return hsa, rid

    async def create(world: World) -> Req:
        hsa, resource = await body(world)
        return Req("POST", base, hsa, resource)

    async def put(world: World) -> Req:
        hsa, resource = await body(world)
        return Req("PUT", f"{base}/mtx-new-{world.next()}", hsa, resource)

    async def read(world: World) -> Req:
        hsa, rid = await existing(world)
        return Req("GET", f"{base}/{rid}", hsa)

    async def delete(world: World) -> Req:
        hsa, rid = await existing(world)
        return Req("DELETE", f"{base}/{rid}", hsa)

    async def search(world: World) -> Req:
        return Req("GET", base, HOME_CARE)

    return {
        ("POST", base): create,
        ("PUT", f"{base}/{{rid}}"): put,
        ("GET", f"{base}/{{rid}}"): read,
        ("DELETE", f"{base}/{{rid}}"): delete,
        ("GET", base): search,
    }


def _fixed(method: str, url: str, owner: str = HOME_CARE, **kw: Any) -> Any:
    async def build(world: World) -> Req:
        return Req(method, url.format(w=world), owner, **kw)

    return build


def _receipt(world: World) -> dict[str, Any]:
    header_id = str(uuid.uuid4())
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{header_id}",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": header_id,
                    "eventCoding": {"system": LUS_EVENT_SYSTEM, "code": "inskrivningsmeddelande"},
                    "source": {"endpoint": "https://fhir.example.se/fhir"},
                    "response": {"identifier": world.notice_id, "code": "ok"},
                },
            }
        ],
    }


def builders() -> dict[tuple[str, str], Callable[[World], Awaitable[Req]]]:
    """How to call each endpoint, and which organisation owns what the call is about."""
    found: dict[tuple[str, str], Callable[[World], Awaitable[Req]]] = {
        ("GET", "/healthz"): _fixed("GET", "/healthz"),
        ("GET", "/readyz"): _fixed("GET", "/readyz"),
        ("GET", "/openapi.json"): _fixed("GET", "/openapi.json"),
        ("GET", "/docs"): _fixed("GET", "/docs"),
        ("GET", "/docs/oauth2-redirect"): _fixed("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"): _fixed("GET", "/redoc"),
        ("GET", "/api/v1/inbox"): _fixed("GET", "/api/v1/inbox"),
        ("GET", "/api/v1/inbox/{notice_id}"): _fixed("GET", "/api/v1/inbox/{w.notice_id}"),
        ("POST", "/api/v1/inbox/{notice_id}/acknowledge"): _fixed(
            "POST", "/api/v1/inbox/{w.notice_id}/acknowledge"
        ),
        ("POST", "/api/v1/inbox/{notice_id}/returns/{kind}"): _fixed(
            "POST", "/api/v1/inbox/{w.notice_id}/returns/sip-avbojd", json={"text": "Avböjd"}
        ),
        ("GET", "/api/v1/messages/{message_id}"): _fixed(
            "GET", "/api/v1/messages/{w.message_id}", HOSPITAL
        ),
        ("GET", "/api/v1/messages"): _fixed(
            "GET", "/api/v1/messages", HOSPITAL, params={"control_id": "MTX-1"}
        ),
        ("GET", "/api/v1/deviations"): _fixed("GET", "/api/v1/deviations"),
        ("GET", "/api/v1/deviations/{deviation_id}"): _fixed(
            "GET", "/api/v1/deviations/{w.deviation_id}"
        ),
        ("GET", "/fhir/DetectedIssue/{deviation_id}"): _fixed(
            "GET", "/fhir/DetectedIssue/{w.deviation_id}"
        ),
        ("POST", "/api/v1/deviations/{deviation_id}/answer"): _fixed(
            "POST", "/api/v1/deviations/{w.deviation_id}/answer", json={"text": "Åtgärdat"}
        ),
        ("GET", "/fhir/Consent/{consent_id}"): _fixed(
            "GET", "/fhir/Consent/{w.consent_id}", HOSPITAL
        ),
        ("GET", "/api/v1/stats"): _fixed("GET", "/api/v1/stats", params={"month": "2026-11"}),
        ("GET", "/api/v1/ops/unmapped-codes"): _fixed("GET", "/api/v1/ops/unmapped-codes"),
    }

    async def process(world: World) -> Req:
        return Req("POST", "/fhir/$process-message", HOME_CARE, _receipt(world))

    async def consent_post(world: World) -> Req:
        return Req("POST", "/fhir/Consent", HOSPITAL, consent_resource(world.pnr))

    async def consent_put(world: World) -> Req:
        return Req("PUT", f"/fhir/Consent/{uuid.uuid4()}", HOSPITAL, consent_resource(world.pnr))

    async def consent_search(world: World) -> Req:
        query = {"patient:identifier": f"{PNR_SYSTEM}|{world.pnr}"}
        return Req("GET", "/fhir/Consent", HOSPITAL, params=query)

    async def audit(world: World) -> Req:
        return Req("POST", "/api/v1/audit/search", HOME_CARE, {"patient": world.pnr})

    found[("POST", "/fhir/$process-message")] = process
    found[("POST", "/fhir/Consent")] = consent_post
    found[("PUT", "/fhir/Consent/{consent_id}")] = consent_put
    found[("GET", "/fhir/Consent")] = consent_search
    found[("POST", "/api/v1/audit/search")] = audit
    for rtype in ("Organization", "HealthcareService", "Endpoint"):
        found.update(_directory_builders(rtype))
    return found


# --------------------------------------------------------------------------- tokens


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(org: str, role: str, /, **changes: Any) -> dict[str, Any]:
    now = int(clock.now().timestamp())
    base: dict[str, Any] = {
        "iss": "brygga",
        "sub": PERSON,
        "org": org,
        "role": role,
        "name": PERSON,
        "title": "Testare",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def bad_tokens(key: Ed25519PrivateKey, org: str, role: str) -> dict[str, str | None]:
    """Every kind of token the gateway must refuse (None: no Authorization header)."""
    now = int(clock.now().timestamp())
    foreign = Ed25519PrivateKey.generate()

    def signed(c: dict[str, Any], k: Ed25519PrivateKey = key) -> str:
        return jwt.encode(c, k, algorithm="EdDSA")

    good = claims(org, role)
    public_pem = key.public_key().public_bytes_raw()
    return {
        "no token": None,
        "expired": signed(claims(org, role, iat=now - 7200, nbf=now - 7200, exp=now - 3600)),
        "foreign key": signed(good, foreign),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(good)}.",
        "HS256 with the public key": jwt.encode(good, public_pem, algorithm="HS256"),
        "not a JWT": "not.a-jwt",
        "exp as text": signed(claims(org, role, exp=str(now + 3600))),
        "iat missing": signed(claims(org, role, iat=None)),
        "not valid yet": signed(claims(org, role, iat=now + 3600, nbf=now + 3600)),
        "org wildcard": signed(claims(org, role, org="*")),
        "org as a list": signed(claims(org, role, org=[org])),
        "unknown role": signed(claims(org, role, role="root")),
        "no name": signed(claims(org, role, name=None)),
        "foreign issuer": signed(claims(org, role, iss="someone-else")),
    }


# --------------------------------------------------------------------------- the test


@pytest.fixture
async def env(
    db: Database, database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, World]]:
    keys_dir = tmp_path / "keys"
    keys = TokenKeys.from_dir(keys_dir)
    app = create_app(db, keys, lambda: [], KEYER)
    pipeline = Pipeline(db)
    world = World(db, database_url.split("+")[0].split(":")[0])
    async with db.transaction() as conn:
        await directory_store.seed_from_file(conn, directory_path(Settings()))
    world.message_id = await pipeline.run(canonical(1), world.control_id)
    async with db.transaction() as conn:
        listed = await inbox.list_notices(conn, HOME_CARE)
        world.notice_id = listed[0]["id"]
        key = KEYER.key(PNR_SYSTEM, world.pnr)
        world.deviation_id = (
            await deviations.raise_deviation(
                conn,
                deviations.NewDeviation(
                    world.message_id,
                    world.notice_id,
                    key,
                    "missed-receipt",
                    HOME_CARE,
                    "0180",
                    "",
                    "Kvittens uteblev",
                ),
                clock.now(),
            )
        ) or ""
    app.state.private_key = ed25519_private_key(keys_dir / "token-ed25519.pem", create=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        admin = {"Authorization": "Bearer " + keys.issue(HOSPITAL, "consent-admin", PERSON)}
        made = await client.post("/fhir/Consent", json=consent_resource(world.pnr), headers=admin)
        assert made.status_code == 201, made.text
        world.consent_id = made.json()["id"]
        yield client, world


def _outcome(response: httpx.Response) -> str:
    if response.status_code == 200 and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        body = response.json()
        items = body.get("ids") if isinstance(body, dict) else body
        if isinstance(items, list) and not items:
            return EMPTY
    return str(response.status_code)


async def test_every_endpoint_is_in_the_table(env) -> None:  # type: ignore[no-untyped-def]
    client, _ = env
    app = client._transport.app  # type: ignore[attr-defined]
    served = app_endpoints(app)
    assert served - set(TABLE) == set(), "endpoints missing from the authorisation table"
    assert set(TABLE) - served == set(), "the table names endpoints the app does not serve"
    assert set(builders()) == set(TABLE)
    assert {role for roles in POLICY.values() for role in roles} <= ROLES


async def test_the_matrix(env) -> None:  # type: ignore[no-untyped-def]
    """Every endpoint x role x own/other organisation answers as the table says; every bad
    token is refused with 401, naming the rule and not the token's contents. (Bad tokens are
    refused before the database is touched: on PostgreSQL only the valid and missing ones.)"""
    client, world = env
    app = client._transport.app  # type: ignore[attr-defined]
    key: Ed25519PrivateKey = app.state.private_key
    make = builders()
    wrong: list[str] = []
    started, calls = time.monotonic(), 0
    for endpoint, expected in sorted(TABLE.items()):
        for role in sorted(ROLES):
            for side in ("own", "other"):
                req = await make[endpoint](world)
                org = req.owner if side == "own" else STRANGER
                token = jwt.encode(claims(org, role), key, algorithm="EdDSA")
                cases: dict[str, str | None] = {"valid": token, **bad_tokens(key, org, role)}
                if world.backend != "sqlite":
                    cases = {k: cases[k] for k in ("valid", "no token")}
                for kind, bearer in cases.items():
                    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
                    r = await client.request(
                        req.method, req.url, json=req.json, params=req.params, headers=headers
                    )
                    calls += 1
                    got = _outcome(r)
                    if expected == ANYONE:
                        want = OK
                        got = OK if r.status_code == 200 else got
                    elif kind != "valid":
                        want = UNAUTHORISED
                        if r.status_code == 401 and (PERSON in r.text or STRANGER in r.text):
                            wrong.append(f"{endpoint} {kind}: the 401 repeats the token")
                    else:
                        assert isinstance(expected, dict)
                        want = expected[role][0 if side == "own" else 1]
                    if got != want:
                        wrong.append(
                            f"{endpoint[0]} {endpoint[1]} {role}/{side} {kind}: "
                            f"{got} (want {want}) {r.text[:120]}"
                        )
    print(f"authz matrix: {calls} requests in {time.monotonic() - started:.1f} s")
    assert wrong == [], "\n".join(wrong)


async def test_a_home_care_integration_stays_in_its_lane(env) -> None:  # type: ignore[no-untyped-def]
    """The findings of issue 9, one by one: a recipient's integration token reads only its own
    deliveries, finds no other sender's MSH-10, cannot switch off another unit's Endpoint,
    record an objection for a patient it has no relation with, or read their consents."""
    client, world = env
    app = client._transport.app  # type: ignore[attr-defined]
    key: Ed25519PrivateKey = app.state.private_key

    def auth(org: str, role: str = "integration") -> dict[str, str]:
        return {"Authorization": "Bearer " + jwt.encode(claims(org, role), key, "EdDSA")}

    home = auth(HOME_CARE)
    ledger = await client.get(f"/api/v1/messages/{world.message_id}", headers=home)
    assert ledger.status_code == 200
    assert {d["recipient"]["hsa_id"] for d in ledger.json()["deliveries"]} == {HOME_CARE}
    whole = await client.get(f"/api/v1/messages/{world.message_id}", headers=auth(HOSPITAL))
    assert len(whole.json()["deliveries"]) > 1
    found = await client.get("/api/v1/messages", params={"control_id": "MTX-1"}, headers=home)
    assert found.json() == {"ids": []}

    night = auth("SE5561234567-HT02")
    endpoint_id = "ep-SE5566778899-HT01-0"
    current = await client.get(f"/fhir/Endpoint/{endpoint_id}", headers=night)
    assert current.status_code == 200
    off = {**current.json(), "status": "off"}
    refused = await client.put(f"/fhir/Endpoint/{endpoint_id}", json=off, headers=night)
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert (await client.put(f"/fhir/Endpoint/{endpoint_id}", json=off, headers=home)).is_success

    stranger_patient = personnummer(2)
    objection = {
        **consent_resource(stranger_patient),
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "sparr"}]}],
        "provision": {"type": "deny"},
    }
    r = await client.post("/fhir/Consent", json=objection, headers=home)
    assert r.status_code == 403 and stranger_patient not in r.text
    # ... nor for its own patient: it received a notice, but recording is the sender's.
    r = await client.post("/fhir/Consent", json=consent_resource(world.pnr), headers=home)
    assert r.status_code == 403
    pipeline = Pipeline(world.db)
    admitted = await pipeline.run(canonical(2), "MTX-2")
    assert await pipeline.status(admitted) != "denied"

    search = {"patient:identifier": f"{PNR_SYSTEM}|{stranger_patient}"}
    assert (await client.get("/fhir/Consent", params=search, headers=night)).status_code == 403
    mine = {"patient:identifier": f"{PNR_SYSTEM}|{world.pnr}"}
    read = await client.get("/fhir/Consent", params=mine, headers=home)
    assert read.status_code == 200 and read.json()["total"] >= 1


def test_tokens_carry_the_person_and_refuse_what_verification_would() -> None:
    keys = TokenKeys(Ed25519PrivateKey.generate())
    token = keys.issue(HOME_CARE, "staff", "Anna Svensson", "Undersköterska", subject="SE-P-1")
    who = keys.verify(token)
    assert (who.org, who.role, who.name, who.title, who.subject) == (
        HOME_CARE,
        "staff",
        "Anna Svensson",
        "Undersköterska",
        "SE-P-1",
    )
    for org, role, name in (
        ("*", "staff", "A"),
        (HOME_CARE, "root", "A"),
        (HOME_CARE, "staff", ""),
    ):
        with pytest.raises(ValueError):
            keys.issue(org, role, name)
    with pytest.raises(ValueError):
        keys.issue(f"{HOME_CARE}\n", "staff", "A")


def test_clock_skew_is_small() -> None:
    key = Ed25519PrivateKey.generate()
    keys = TokenKeys(key)
    now = int(clock.now().timestamp())
    early = claims(HOME_CARE, "staff", iat=now + 30, nbf=now + 30)
    assert keys.verify(jwt.encode(early, key, algorithm="EdDSA")).org == HOME_CARE
    for late in (now + 120, now + 3600):
        future = claims(HOME_CARE, "staff", iat=late, nbf=late)
        with pytest.raises(TokenRefused, match="not valid yet"):
            keys.verify(jwt.encode(future, key, algorithm="EdDSA"))
    stale = claims(HOME_CARE, "staff", iat=now - 7200, nbf=now - 7200, exp=now - 120)
    with pytest.raises(TokenRefused, match="expired"):
        keys.verify(jwt.encode(stale, key, algorithm="EdDSA"))
    flag = claims(HOME_CARE, "staff", exp=True)
    with pytest.raises(TokenRefused, match="integer"):
        keys.verify(jwt.encode(flag, key, algorithm="EdDSA"))
