"""The directory: FHIR mapping both ways, the TOML loader's errors, staffed hours over a week
with public holidays, the store (seeding, cached load, care relations) and the /fhir API on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.directory import (
    CHANNELS,
    KINDS,
    Directory,
    DirectoryError,
    Endpoint,
    Hours,
    Organisation,
)
from gateway.directory import store as directory_store
from gateway.directory.fhir import (
    CONNECTION_SYSTEM,
    KIND_SYSTEM,
    ON_CALL_EXT,
    DirectoryInvalid,
    from_resources,
    parse,
    to_bundle,
    to_resources,
)
from gateway.model.identifiers import HSA_SYSTEM
from gateway.runtime import directory_path
from gateway.settings import Settings
from gateway.store.db import Database
from tests.support import STOCKHOLM

DEMO = directory_path(Settings())
NEEDS = "SE2120001637-B020"
HOME_DAY = "SE5566778899-HT01"
NIGHT = "SE5561234567-HT02"
ON_CALL = "SE2120001637-T050"
MAS = "SE2120001637-M060"
OPS = "SE2321000016-OPS1"


# --------------------------------------------------------------------------- FHIR mapping


def test_the_demo_directory_survives_the_trip_through_fhir() -> None:
    demo = Directory.load(DEMO)
    resources = to_resources(demo)
    for r in resources:
        parse(r, r["resourceType"])
    back = from_resources(resources)
    assert list(back) == list(demo) and back.municipalities == demo.municipalities
    kinds = {o.kind for o in demo}
    assert {"primary-care", "needs-assessment", "home-care", "home-care-night", "sabo"} <= kinds
    assert {"rehab", "on-call", "municipal-health-care"} <= kinds
    stockholm = demo.municipality("0180")
    assert stockholm is not None and stockholm.mas == MAS and stockholm.deviations == MAS
    assert demo.get(NEEDS).on_call == ON_CALL  # type: ignore[union-attr]


_name = st.from_regex(r"[A-ZÅÄÖ][a-zåäö]{1,12}( [A-ZÅÄÖa-zåäö]{1,10}){0,2}", fullmatch=True)
_addresses = {
    "fhir": st.integers(1, 999).map(lambda n: f"https://fhir{n}.example.se/fhir"),
    "hl7v2": st.integers(1, 65535).map(lambda n: f"mllp-host.example.se:{n}"),
    "vodok": st.sampled_from(["", "sftp://vodok.stockholm.se/in", "file:///srv/vodok/in"]),
    "inbox": st.just(""),
    "fax": st.from_regex(r"\+46[0-9]{6,9}", fullmatch=True),
    "letter": st.text(st.sampled_from("Box 12, 127 26 Skärholmen:/%"), max_size=30),
}
_endpoints = st.sampled_from(CHANNELS).flatmap(
    lambda ch: _addresses[ch].map(lambda a: Endpoint(ch, a))
)


@st.composite
def _hours(draw: st.DrawFn) -> Hours:
    opens = draw(st.integers(0, 22 * 60))
    closes = draw(st.integers(opens + 1, 24 * 60 - 1))
    days = draw(st.frozensets(st.integers(0, 6), min_size=1))
    return Hours(
        days,
        time(opens // 60, opens % 60),
        time(closes // 60, closes % 60),
        draw(st.booleans()),
    )


@st.composite
def _directories(draw: st.DrawFn) -> Directory:
    ids = draw(
        st.lists(
            st.from_regex(r"SE[0-9]{10}-[0-9A-Za-z]{1,8}", fullmatch=True),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    orgs = []
    for i, hsa in enumerate(ids):
        orgs.append(
            Organisation(
                hsa_id=hsa,
                name=draw(_name),
                kind=draw(st.sampled_from(sorted(KINDS))),
                municipality=draw(st.sampled_from(["", "0180", "0126"])),
                endpoints=tuple(draw(st.lists(_endpoints, max_size=3))),
                district=draw(st.sampled_from(["", "Skärholmen", "Södermalm"])),
                hours=tuple(draw(st.lists(_hours(), max_size=2))),
                on_call=draw(st.sampled_from(["", *ids[:i]])),
            )
        )
    return Directory(orgs)


@settings(max_examples=40, deadline=None)
@given(_directories())
def test_any_directory_survives_the_trip_through_fhir(directory: Directory) -> None:
    resources = to_resources(directory)
    for r in resources:
        parse(r, r["resourceType"])
    assert list(from_resources(resources)) == list(directory)


# --------------------------------------------------------------------------- the TOML file


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dir.toml"
    path.write_text(text, encoding="utf-8")
    return path


UNIT = '[[organisation]]\nhsa_id = "SE5566778899-A1"\nname = "A"\nkind = "home-care"\n'


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('channels = ["pigeon"]\n', "channel 'pigeon' must be one of"),
        ('[[organisation.endpoint]]\nchannel = "fhir"\n', "a fhir endpoint needs an address"),
        ('hours = [{ days = "mon-fri", opens = "17:00", closes = "08:00" }]\n', "close"),
        ('hours = [{ days = "mon-fri", opens = "08:00", closes = "08:00" }]\n', "close"),
        ('hours = [{ days = "fri-mon", opens = "08:00", closes = "17:00" }]\n', "backwards"),
        ('hours = [{ days = "weekdays", opens = "08:00", closes = "17:00" }]\n', "hours need"),
        ('hours = [{ days = "mon", opens = "8 am", closes = "17:00" }]\n', "hours need"),
        ('on_call = "SE2120001637-X999"\n', "on_call SE2120001637-X999 is not in the directory"),
    ],
)
def test_the_toml_loader_says_what_is_wrong(tmp_path: Path, extra: str, error: str) -> None:
    with pytest.raises(DirectoryError, match=error):
        Directory.load(_write(tmp_path, UNIT + extra))


def test_a_municipality_must_name_units_in_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path, UNIT + '[[municipality]]\ncode = "0180"\nname = "S"\nmas = "SE1111111111-M"\n'
    )
    with pytest.raises(DirectoryError, match="municipality 0180: mas SE1111111111-M"):
        Directory.load(path)


# --------------------------------------------------------------------------- staffed hours


def _at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=STOCKHOLM)


def test_staffed_at_over_christmas_week() -> None:
    demo = Directory.load(DEMO)
    needs, home, night = demo.get(NEEDS), demo.get(HOME_DAY), demo.get(NIGHT)
    assert needs and home and night
    # Monday 21 to Wednesday 23 December: mon-fri 08:00-17:00, the end not included.
    for day in (21, 22, 23):
        assert needs.staffed_at(_at(day, 8)) and needs.staffed_at(_at(day, 16, 59))
        assert not needs.staffed_at(_at(day, 7, 59)) and not needs.staffed_at(_at(day, 17))
    # Christmas Eve (an eve counts as a holiday) and Christmas Day: closed all day.
    for day in (24, 25):
        assert not any(needs.staffed_at(_at(day, h)) for h in range(24))
    # The weekend: closed.
    assert not any(needs.staffed_at(_at(d, h)) for d in (26, 27) for h in range(24))
    # The same instant given in UTC: 07:00 UTC is 08:00 in Stockholm in winter.
    assert needs.staffed_at(datetime(2026, 12, 21, 7, 0, tzinfo=UTC))
    assert not needs.staffed_at(datetime(2026, 12, 21, 6, 59, tzinfo=UTC))
    # Day home care works every day, public holidays too, 07:00-22:00.
    assert home.staffed_at(_at(25, 7)) and home.staffed_at(_at(24, 21, 59))
    assert not home.staffed_at(_at(25, 22)) and not home.staffed_at(_at(26, 6, 59))
    # No hours: around the clock.
    assert all(night.staffed_at(_at(d, h)) for d in range(21, 28) for h in range(24))


# --------------------------------------------------------------------------- the store


async def test_seeding_from_toml_happens_once_and_load_is_cached(db: Database) -> None:
    async with db.transaction() as conn:
        stored = await directory_store.seed_from_file(conn, DEMO)
        assert stored == len(to_resources(Directory.load(DEMO)))
        assert await directory_store.seed_from_file(conn, DEMO) == 0
        first = await directory_store.load(conn)
        assert list(first) == list(Directory.load(DEMO))
        assert await directory_store.load(conn) is first  # nothing changed: the same object
        org = await directory_store.get(conn, "Organization", NIGHT)
        assert org is not None
        await directory_store.save(conn, "Organization", NIGHT, {**org.resource, "name": "Natt"})
        second = await directory_store.load(conn)
    assert second is not first and second.get(NIGHT).name == "Natt"  # type: ignore[union-attr]


async def test_seeding_from_a_fhir_bundle(db: Database, tmp_path: Path) -> None:
    bundle = tmp_path / "directory.json"
    bundle.write_text(json.dumps(to_bundle(Directory.load(DEMO))), encoding="utf-8")
    async with db.transaction() as conn:
        assert await directory_store.seed_from_file(conn, bundle) > 0
        loaded = await directory_store.load(conn)
    assert list(loaded) == list(Directory.load(DEMO))
    assert loaded.municipality("0180") == Directory.load(DEMO).municipality("0180")


def test_a_bad_bundle_file_says_which_entry(tmp_path: Path) -> None:
    data = to_bundle(Directory.load(DEMO))
    path = tmp_path / "bad.json"
    broken = json.loads(json.dumps(data))
    broken["entry"][0]["resource"]["identifier"][0]["value"] = "SE1-x"
    path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(DirectoryError, match=r"entry\[0\].*Organization.identifier.value"):
        directory_store.read_file(path)
    dangling = json.loads(json.dumps(data))
    dangling["entry"] = [e for e in dangling["entry"] if e["resource"]["id"] != ON_CALL]
    path.write_text(json.dumps(dangling), encoding="utf-8")
    with pytest.raises(DirectoryError, match=f"HSA-id {ON_CALL} is not in the directory"):
        directory_store.read_file(path)
    path.write_text('{"resourceType": "Patient"}', encoding="utf-8")
    with pytest.raises(DirectoryError, match="not a FHIR Bundle"):
        directory_store.read_file(path)


async def test_care_relations_per_kind(db: Database) -> None:
    key = "p" * 64
    async with db.transaction() as conn:
        await directory_store.remember(
            conn, key, [("hemtjanst", HOME_DAY), ("hemtjanst-natt", NIGHT)], "m1"
        )
        await directory_store.remember(conn, key, [("hemtjanst", HOME_DAY)], "m1")  # replay
        assert await directory_store.providers(conn, key) == [
            ("hemtjanst", HOME_DAY),
            ("hemtjanst-natt", NIGHT),
        ]
        # A new day provider ends the old one; the night provider is untouched.
        await directory_store.remember(conn, key, [("hemtjanst", "SE5560000000-HT09")], "m2")
        assert await directory_store.providers(conn, key) == [
            ("hemtjanst", "SE5560000000-HT09"),
            ("hemtjanst-natt", NIGHT),
        ]
        # Objects with role and hsa_id (CareParty) work too; parties without an HSA-id do not.
        from gateway.model.bundle import CareParty

        await directory_store.remember(
            conn, key, [CareParty("sabo", "SE2120001637-S030"), CareParty("rehab", "")], "m3"
        )
        assert ("sabo", "SE2120001637-S030") in await directory_store.providers(conn, key)
        # A merge moves the prior identity's relations to the surviving patient.
        await directory_store.remember(conn, "q" * 64, [("listed-clinic", "SE1")], "m4")
        await directory_store.merge(conn, ["q" * 64], key)
        assert ("listed-clinic", "SE1") in await directory_store.providers(conn, key)
        assert await directory_store.providers(conn, "q" * 64) == []
        assert await directory_store.providers(conn, "nobody") == []


# --------------------------------------------------------------------------- the API


@pytest.fixture
async def api(db: Database, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys]]:
    async with db.transaction() as conn:
        await directory_store.seed_from_file(conn, DEMO)
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, keys


def auth(keys: TokenKeys, role: str = "directory-admin", org: str = OPS) -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue(org, role, "Kim Katalog")}


def _org(hsa: str = "SE5569990000-HT07", kind: str = "home-care") -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "identifier": [{"system": HSA_SYSTEM, "value": hsa}],
        "type": [{"coding": [{"system": KIND_SYSTEM, "code": kind}]}],
        "name": "Nya Hemtjänsten AB",
    }


def _endpoint(org_id: str, code: str = "fax", address: str | None = "tel:+4681234567"):  # type: ignore[no-untyped-def]
    system = (
        CONNECTION_SYSTEM
        if code in ("fax", "inbox", "letter", "vodok")
        else ("http://terminology.hl7.org/CodeSystem/endpoint-connection-type")
    )
    resource = {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {"system": system, "code": code},
        "managingOrganization": {"reference": f"Organization/{org_id}"},
        "payloadType": [{"text": "LUS"}],
    }
    if address is not None:
        resource["address"] = address
    return resource


def _service(org_id: str, endpoints: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "HealthcareService",
        "providedBy": {"reference": f"Organization/{org_id}"},
        "endpoint": [{"reference": f"Endpoint/{e}"} for e in endpoints],
        **extra,
    }


def _expr(r: httpx.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["expression"][0])


async def test_a_new_unit_over_the_api_reaches_the_directory(api, db: Database) -> None:  # type: ignore[no-untyped-def]
    client, keys = api
    h = auth(keys)
    r = await client.post("/fhir/Organization", json=_org(), headers=h)
    assert r.status_code == 201 and r.headers["etag"] == 'W/"1"'
    org_id = r.json()["id"]
    assert r.headers["location"] == f"/fhir/Organization/{org_id}/_history/1"
    r = await client.put("/fhir/Endpoint/ep-new-fax", json=_endpoint(org_id), headers=h)
    assert r.status_code == 201
    r = await client.put(
        "/fhir/Endpoint/ep-new-inbox",
        json=_endpoint(org_id, "inbox", "urn:brygga:inbox"),
        headers=h,
    )
    hours = [
        {
            "daysOfWeek": ["mon", "tue", "wed", "thu", "fri"],
            "availableStartTime": "07:00:00",
            "availableEndTime": "22:00:00",
        }
    ]
    on_call = [
        {
            "url": ON_CALL_EXT,
            "valueReference": {"identifier": {"system": HSA_SYSTEM, "value": ON_CALL}},
        }
    ]
    service = _service(
        org_id, ["ep-new-inbox", "ep-new-fax"], availableTime=hours, extension=on_call
    )
    r = await client.post("/fhir/HealthcareService", json=service, headers=h)
    assert r.status_code == 201, r.text
    async with db.read() as conn:
        unit = (await directory_store.load(conn)).get("SE5569990000-HT07")
    assert unit is not None and unit.channels == ("inbox", "fax")
    assert unit.endpoint("fax") == Endpoint("fax", "+4681234567") and unit.on_call == ON_CALL
    assert unit.hours == (Hours(frozenset(range(5)), time(7), time(22)),)
    # Searches: by HSA-id, and by organisation.
    found = await client.get(
        "/fhir/Organization", params={"identifier": f"{HSA_SYSTEM}|SE5569990000-HT07"}, headers=h
    )
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [org_id]
    base = str(client.base_url).rstrip("/")  # fullUrl absolute, on the caller's base
    assert [e["fullUrl"] for e in found.json()["entry"]] == [f"{base}/fhir/Organization/{org_id}"]
    found = await client.get("/fhir/Endpoint", params={"organization": org_id}, headers=h)
    assert {e["resource"]["id"] for e in found.json()["entry"]} == {"ep-new-fax", "ep-new-inbox"}
    found = await client.get(
        "/fhir/HealthcareService", params={"organization": f"Organization/{org_id}"}, headers=h
    )
    assert found.json()["total"] == 1
    # An update is a new version; If-Match with an old one is refused.
    renamed = {**_org(), "name": "Bytt namn AB"}
    r = await client.put(f"/fhir/Organization/{org_id}", json=renamed, headers=h)
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    r = await client.put(
        f"/fhir/Organization/{org_id}", json=renamed, headers={**h, "If-Match": 'W/"1"'}
    )
    assert r.status_code == 412
    # Reading needs integration, ops or directory-admin.
    r = await client.get(f"/fhir/Organization/{org_id}", headers=auth(keys, "ops"))
    assert r.status_code == 200 and r.json()["name"] == "Bytt namn AB"


async def test_each_invalid_input_names_its_element(api) -> None:  # type: ignore[no-untyped-def]
    client, keys = api
    h = auth(keys)
    hs = f"/fhir/HealthcareService/hs-{NIGHT}"
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/fhir/Organization/x1", _org("SE12-x"), 400, "Organization.identifier.value"),
        ("/fhir/Organization/x1", _org(kind="spa"), 400, "Organization.type.coding.code"),
        ("/fhir/Organization/x1", {**_org(), "type": []}, 400, "Organization.type"),
        ("/fhir/Organization/x1", _org(NIGHT), 400, "Organization.identifier.value"),
        ("/fhir/Organization/x1", {"resourceType": "Patient"}, 400, "Organization"),
        (
            "/fhir/Endpoint/e1",
            _endpoint(NIGHT, "pigeon"),
            400,
            "Endpoint.connectionType",
        ),
        (
            "/fhir/Endpoint/e1",
            _endpoint(NIGHT, "hl7-fhir-msg", "urn:brygga:fhir"),
            400,
            "Endpoint.address",
        ),
        ("/fhir/Endpoint/e1", _endpoint(NIGHT, "hl7v2-mllp", None), 400, "Endpoint.address"),
        (
            "/fhir/Endpoint/e1",
            _endpoint(NIGHT, "hl7v2-mllp", "mllp://no-port"),
            400,
            "Endpoint.address",
        ),
        (
            "/fhir/Endpoint/e1",
            _endpoint("missing-org"),
            404,
            "Endpoint.managingOrganization",
        ),
        (
            hs,
            _service(
                NIGHT,
                [],
                availableTime=[
                    {
                        "daysOfWeek": ["mon"],
                        "availableStartTime": "17:00:00",
                        "availableEndTime": "08:00:00",
                    }
                ],
            ),
            400,
            "HealthcareService.availableTime[0].availableEndTime",
        ),
        (
            hs,
            _service(
                NIGHT, [], availableTime=[{"daysOfWeek": ["mon"], "availableStartTime": "25:00"}]
            ),
            400,
            "HealthcareService.availableTime[0].availableStartTime",
        ),
        (
            hs,
            _service(
                NIGHT,
                [],
                extension=[
                    {
                        "url": ON_CALL_EXT,
                        "valueReference": {
                            "identifier": {"system": HSA_SYSTEM, "value": "SE2120001637-X999"}
                        },
                    }
                ],
            ),
            404,
            f"HealthcareService.extension.where(url='{ON_CALL_EXT}').valueReference"
            ".identifier.value",
        ),
        (hs, _service(NIGHT, ["no-such-endpoint"]), 404, "HealthcareService.endpoint[0]"),
        (hs, _service("no-such-org", []), 404, "HealthcareService.providedBy"),
        (
            "/fhir/HealthcareService/hs-two",
            _service(NIGHT, []),
            400,
            "HealthcareService.providedBy",
        ),
        ("/fhir/Organization/other-id", {**_org(), "id": "x"}, 400, "Organization.id"),
    ]
    for url, body, code, expression in cases:
        r = await client.put(url, json=body, headers=h)
        assert (r.status_code, _expr(r)) == (code, expression), (url, body, r.text)
    r = await client.get("/fhir/Organization", params={"identifier": "urn:x|1"}, headers=h)
    assert r.status_code == 400 and _expr(r) == "identifier"


async def test_auth_missing_and_referenced(api) -> None:  # type: ignore[no-untyped-def]
    client, keys = api
    h = auth(keys)
    assert (await client.get(f"/fhir/Organization/{NEEDS}")).status_code == 401
    r = await client.put("/fhir/Organization/x", json=_org(), headers=auth(keys, "ops"))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    r = await client.get(f"/fhir/Organization/{NEEDS}", headers=auth(keys, "staff"))
    assert r.status_code == 403
    # An integration writes only its own unit (tests/test_authz_matrix.py has every case).
    r = await client.put("/fhir/Organization/x", json=_org(), headers=auth(keys, "integration"))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    own = auth(keys, "integration", "SE5569990000-HT07")
    assert (await client.put("/fhir/Organization/x", json=_org(), headers=own)).status_code == 201
    r = await client.get("/fhir/Endpoint/nothing", headers=h)
    assert r.status_code == 404 and _expr(r) == "Endpoint.id"
    assert (await client.delete("/fhir/Endpoint/nothing", headers=h)).status_code == 404
    # The on-call unit and the MAS are named by others: not deleted.
    r = await client.delete(f"/fhir/Organization/{ON_CALL}", headers=h)
    assert r.status_code == 409 and f"HealthcareService/hs-{NEEDS}" in r.text
    r = await client.delete(f"/fhir/Organization/{MAS}", headers=h)
    assert r.status_code == 409 and "kommun-0180" in r.text
    # Nor an Endpoint a service lists, nor its HSA-id changed away under the referrers.
    r = await client.delete(f"/fhir/Endpoint/ep-{NIGHT}-0", headers=h)
    assert r.status_code == 409
    r = await client.put(
        f"/fhir/Organization/{ON_CALL}", json=_org("SE2120001637-T051", "on-call"), headers=h
    )
    assert r.status_code == 409 and _expr(r) == "Organization.identifier.value"
    # Take a unit apart from the top: service, endpoints, then the unit.
    assert (
        await client.delete(f"/fhir/HealthcareService/hs-{NIGHT}", headers=h)
    ).status_code == 204
    assert (await client.delete(f"/fhir/Endpoint/ep-{NIGHT}-0", headers=h)).status_code == 204
    assert (await client.delete(f"/fhir/Organization/{NIGHT}", headers=h)).status_code == 204
    r = await client.get(f"/fhir/Organization/{NIGHT}", headers=h)
    assert r.status_code == 410
    found = await client.get(
        "/fhir/Organization", params={"identifier": f"{HSA_SYSTEM}|{NIGHT}"}, headers=h
    )
    assert found.json()["total"] == 0


def test_parse_rejects_what_is_not_a_resource() -> None:
    with pytest.raises(DirectoryInvalid) as caught:
        parse([], "Endpoint")
    assert caught.value.path == "Endpoint"
