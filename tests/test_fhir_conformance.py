"""Brygga's FHIR R4 Bundles as another reader sees them (issue 10, "FHIR R4 message Bundles
others can resolve").

Every check here goes through the independent validator (tests/services/fhir_validator.py:
the official R4 JSON schema, every R4 invariant by fhirpath.js, reference resolution by the
R4 Bundle rules §2.36.4.1, reachability from MessageHeader), never the gateway's own models.
Readers must still understand Bundles stored before: ``Type/id`` references, the "R" label.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.model.bundle import (
    CONSENT_BASIS_SYSTEM,
    CONSENT_POLICIES,
    SE_SECURITY_SYSTEM,
    SECURITY_SYSTEM,
    Attachment,
    CanonicalMessage,
    CareParty,
    Coding,
    ConsentBasis,
    Diagnosis,
    Document,
    MedicationEntry,
    Referral,
    read_bundle,
    resolve,
    resources_by_ref,
    to_bundle,
    withhold,
)
from gateway.model.consent import PURPOSE_SYSTEM
from gateway.model.events import LusEvent
from gateway.model.identifiers import (
    HSA_SYSTEM,
    KIND_BY_SYSTEM,
    LOCAL_UNIT_SYSTEM,
    SYSTEMS,
    IdentifierKind,
    PatientId,
    parse_identity_number,
    parse_reservnummer,
)
from gateway.store.db import Database
from mappings import MAPPINGS_DIR
from tests.inprocess import HOME_CARE, KEYER, canonical
from tests.services.fhir_validator import Report, validate
from tests.standins import response_bundle
from tests.support import personnummer

GOLDEN = sorted((MAPPINGS_DIR / "takecare" / "golden").glob("*.json"))
STOCKHOLM = ZoneInfo("Europe/Stockholm")
AT = datetime(2026, 11, 23, 9, 30, tzinfo=STOCKHOLM)


def full_message(sender: str = "SE2321000016-H001") -> CanonicalMessage:
    """A message with every kind of content to_bundle renders."""
    return CanonicalMessage(
        event=LusEvent.INSKRIVNINGSMEDDELANDE,
        occurred_at=AT,
        sender_hsa_id=sender,
        sender_name="Södersjukhuset",
        patient_ids=[parse_identity_number(personnummer(3))],
        family="Tolvansson",
        given="Tolvan",
        protected_identity=True,
        encounter_id="V-1",
        admitted_at=AT,
        expected_discharge=AT,
        listed_clinic=CareParty("listed-clinic", "SE2321000016-V010", "VC"),
        care_parties=[CareParty("hemtjanst", HOME_CARE, "HT")],
        consent=ConsentBasis("menprovning", AT, "SE2321000016-L001"),
        note="Rollator <inomhus> & trappor",
        diagnoses=[Diagnosis(Coding("urn:oid:1.2.752.116.1.1.1", "S72.0"), "AD", 1, AT)],
        medications=[MedicationEntry(Coding("http://www.whocc.no/atc", "N02BE01"), "1x3", "1")],
        documents=[
            Document(
                "epikris",
                "Epikris",
                (Attachment("application/pdf", data="JVBERi0="),),
                "DOC-1",
                AT,
                flags=("nursing-referral",),
            )
        ],
        referral=Referral(CareParty("rehab", "SE2120001637-B020", "Rehab"), "rehab", "Rehab"),
        replaces_ids=[parse_reservnummer("RES-1234", "1.2.752.97.3.1.3")],
    )


def old_style(bundle: dict[str, Any]) -> dict[str, Any]:
    """The Bundle as Brygga wrote it before: ``Type/id`` references (what stored Bundles and
    some FHIR clients use); the protected identity as v3-Confidentiality "R"."""
    names = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle["entry"]
    }
    text = json.dumps(bundle)
    for full, name in names.items():
        text = text.replace(f'"{full}"', f'"{name}"').replace(
            f'"fullUrl": "{name}"', f'"fullUrl": "{full}"'
        )
    old = json.loads(text)
    for e in old["entry"]:
        for label in e["resource"].get("meta", {}).get("security", []):
            label.update(system=SECURITY_SYSTEM, code="R")
    return old


def assert_valid(reports: list[Report], names: list[str]) -> None:
    bad = {n: r.text() for n, r in zip(names, reports, strict=True) if r.errors}
    assert not bad, "\n\n".join(f"{n}:\n{t}" for n, t in bad.items())


# --- the independent validator over every golden Bundle and what the gateway makes --------


def test_every_golden_bundle_passes_the_independent_validator() -> None:
    bundles = [json.loads(p.read_text("utf-8")) for p in GOLDEN]
    assert len(bundles) >= 20
    made = [
        to_bundle(full_message()),
        to_bundle(full_message(sender="TC-AVD-12")),  # an unmapped sender code
        withhold(to_bundle(full_message()), ["medication", "nursing-referral"]),
        to_bundle(canonical(1, protected=True)),
    ]
    reports = validate(bundles + made)
    assert_valid(reports, [p.name for p in GOLDEN] + ["full", "local sender", "withheld", "inproc"])
    # narrative where a human reader needs one
    narrated = {
        w["path"].split()[-1].rstrip(":")
        for r in reports
        for w in r.warnings
        if w["key"] == "dom-6"
    }
    assert not narrated & {"CarePlan", "DocumentReference", "ServiceRequest"}


def test_the_validator_finds_what_is_wrong() -> None:
    """It must be able to fail: each known-bad Bundle is reported with the right key."""
    good = to_bundle(full_message())
    dangling = copy.deepcopy(good)
    dangling["entry"][2]["resource"]["subject"] = {
        "reference": "urn:uuid:00000000-0000-4000-8000-000000000000"
    }
    no_policy = copy.deepcopy(good)
    for e in no_policy["entry"]:
        e["resource"].pop("policy", None)
    unreachable = copy.deepcopy(good)
    unreachable["entry"][0]["resource"]["focus"] = unreachable["entry"][0]["resource"]["focus"][:1]
    bad_schema = copy.deepcopy(good)
    bad_schema["entry"][1]["resource"]["gender"] = "okänt"
    reports = validate([good, dangling, no_policy, unreachable, bad_schema, old_style(good)])
    assert reports[0].errors == []
    assert "bundle-resolution" in reports[1].keys()
    assert "ppc-1" in reports[2].keys()
    assert reports[3].keys() == {"message-focus"}
    assert any(e["check"] == "schema" for e in reports[4].errors)
    # Type/id references inside urn:uuid entries have no defined meaning (§2.36.4.1)
    assert "bundle-resolution" in reports[5].keys()


# --- references: written as urn:uuid, read in both styles ----------------------------------


def test_every_reference_is_a_fullurl_of_the_bundle() -> None:
    bundle = to_bundle(full_message())
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    refs = re.findall(r'"reference": "([^"]+)"', json.dumps(bundle))
    assert len(refs) > 20 and set(refs) <= full_urls


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_readers_read_stored_type_id_bundles_as_the_new_ones(path: Path) -> None:
    new = json.loads(path.read_text("utf-8"))
    old = old_style(new)
    assert old != new
    assert read_bundle(old) == read_bundle(new)
    for kinds in (["medication"], ["nursing-referral"]):
        assert read_bundle(withhold(old, kinds)) == read_bundle(withhold(new, kinds))


def test_resolve_by_fullurl_type_id_and_absolute_url() -> None:
    bundle = to_bundle(full_message())
    index = resources_by_ref(bundle)
    patient = index["Patient/patient"]
    full = next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is patient)
    assert resolve(index, {"reference": full}) is patient
    assert resolve(index, "Patient/patient") is patient
    assert resolve(index, "https://fhir.example.se/fhir/Patient/patient") is patient
    assert resolve(index, {"identifier": {"value": "x"}}) is None
    assert resolve(index, "Patient/nobody") is None


@pytest.mark.parametrize("style", ["new", "old"])
def test_withhold_drops_the_content_and_every_reference_to_it(style: str) -> None:
    bundle = to_bundle(full_message())
    if style == "old":
        bundle = old_style(bundle)
    gone_names = {
        name
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in ("MedicationStatement", "DocumentReference")
        for name in (e["fullUrl"], f"{e['resource']['resourceType']}/{e['resource']['id']}")
    }
    kept = withhold(bundle, ["medication", "nursing-referral"])
    types = [e["resource"]["resourceType"] for e in kept["entry"]]
    assert "MedicationStatement" not in types and "DocumentReference" not in types
    text = json.dumps(kept)
    assert gone_names and not [n for n in gone_names if f'"{n}"' in text]
    assert "ServiceRequest" in types  # the rest stays


@settings(max_examples=40, deadline=None)
@given(
    meds=st.integers(0, 3),
    docs=st.integers(0, 2),
    parties=st.integers(0, 3),
    consent=st.sampled_from([None, "samtycke", "menprovning", "sparr"]),
    careplan=st.booleans(),
)
def test_every_entry_is_reachable_from_the_header(
    meds: int, docs: int, parties: int, consent: str | None, careplan: bool
) -> None:
    """Checked here in Python over many shapes; the Node validator checks the same rule."""
    msg = full_message()
    msg.event = LusEvent.INSKRIVNINGSMEDDELANDE if careplan else LusEvent.UTSKRIVNINGSMEDDELANDE
    msg.medications = msg.medications * meds
    msg.documents = msg.documents * docs
    msg.care_parties = [CareParty("hemtjanst", f"SE2120000829-HT0{i}") for i in range(parties)]
    msg.consent = ConsentBasis(consent) if consent else None
    bundle = to_bundle(msg)
    by_url = {e["fullUrl"]: i for i, e in enumerate(bundle["entry"])}
    seen, todo = {0}, [0]
    while todo:
        resource = bundle["entry"][todo.pop()]["resource"]
        for ref in re.findall(r'"reference": "([^"]+)"', json.dumps(resource)):
            if by_url[ref] not in seen:
                seen.add(by_url[ref])
                todo.append(by_url[ref])
    assert seen == set(range(len(bundle["entry"])))


# --- Consent, organisations, identifiers, labels -------------------------------------------


@pytest.mark.parametrize("basis", sorted(CONSENT_POLICIES))
def test_consent_names_its_legal_basis(basis: str) -> None:
    msg = full_message()
    msg.consent = ConsentBasis(basis, AT)
    consent = resources_by_ref(to_bundle(msg))["Consent/consent"]
    uris = [p["uri"] for p in consent["policy"]]
    assert uris == list(CONSENT_POLICIES[basis])
    assert all(u.startswith("https://www.riksdagen.se/") for u in uris)
    assert read_bundle(to_bundle(msg)).consent_basis == basis


def test_organisation_identifiers_hsa_only_for_hsa_ids() -> None:
    bundle = to_bundle(full_message(sender="TC-AVD-12"))
    index = resources_by_ref(bundle)
    sender = resolve(index, bundle["entry"][0]["resource"]["sender"])
    assert sender is not None
    assert sender["identifier"] == [{"system": LOCAL_UNIT_SYSTEM, "value": "TC-AVD-12"}]
    hsa = index["Organization/org-se2321000016-v010"]["identifier"][0]
    assert hsa["system"] == HSA_SYSTEM and hsa["type"]["coding"][0]["code"] == "PRN"
    # routing keys on the sender as before: its local code when it has no HSA-id
    assert read_bundle(bundle).sender_hsa_id == "TC-AVD-12"
    assert read_bundle(to_bundle(full_message())).sender_hsa_id == "SE2321000016-H001"


def test_protected_identity_with_the_swedish_label_and_the_old_one() -> None:
    bundle = to_bundle(full_message())
    labels = resources_by_ref(bundle)["Patient/patient"]["meta"]["security"]
    assert labels == [
        {
            "system": SE_SECURITY_SYSTEM,
            "code": "sekretessmarkering",
            "display": "Sekretessmarkering",
        }
    ]
    assert read_bundle(bundle).protected_identity
    assert read_bundle(old_style(bundle)).protected_identity
    unprotected = to_bundle(canonical(1))
    assert not read_bundle(unprotected).protected_identity


def test_a_regional_reservnummer_is_not_a_national_one() -> None:
    regional = parse_reservnummer("RES-1234", "urn:oid:1.2.752.97.3.1.3")
    national = parse_reservnummer("RES-1234", "1.2.752.129.2.1.3.2")
    assert regional.fhir_system == "urn:oid:1.2.752.97.3.1.3"
    assert national.fhir_system.endswith("/nationelltReservnummer")
    assert regional == national and regional.system == national.system  # one patient key
    assert KIND_BY_SYSTEM[regional.fhir_system] is IdentifierKind.RESERVNUMMER
    assert PatientId.from_fhir(regional.fhir_system, "RES-1234").fhir_system == regional.fhir_system
    golden = json.loads((MAPPINGS_DIR / "takecare/golden/adt_a01_reservnummer.json").read_text())
    systems = [i["system"] for i in resources_by_ref(golden)["Patient/patient"]["identifier"]]
    assert "urn:oid:1.2.752.97.3.1.3" in systems
    assert "http://electronichealth.se/identifier/nationelltReservnummer" not in systems


def test_business_identifiers_have_a_system() -> None:
    index = resources_by_ref(to_bundle(full_message()))
    for ident in (
        index["Encounter/encounter"]["identifier"][0],
        index["DocumentReference/document-1"]["masterIdentifier"],
    ):
        assert ident["system"].startswith("https://brygga.dev/fhir/NamingSystem/local-identifier/")
        assert ident["system"].endswith("/SE2321000016-H001")


def test_source_endpoint_is_the_gateway_fhir_base() -> None:
    from gateway.settings import Settings

    s = Settings(public_base_url="https://brygga.region.se/")
    assert s.fhir_endpoint == "https://brygga.region.se/fhir"
    assert Settings(http_port=9443).fhir_endpoint == "http://127.0.0.1:9443/fhir"
    bundle = to_bundle(full_message(), source_endpoint=s.fhir_endpoint)
    assert bundle["entry"][0]["resource"]["source"]["endpoint"] == s.fhir_endpoint


# --- response messages --------------------------------------------------------------------


@pytest.fixture
async def api(db: Database, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys]]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [], KEYER)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://brygga.test") as client:
        yield client, keys


async def test_process_message_answer_names_the_request_header(
    api: tuple[httpx.AsyncClient, TokenKeys], db: Database
) -> None:
    from tests.test_channels import home_care_delivery, integration

    client, keys = api
    delivery_id = await home_care_delivery(db)
    request = response_bundle(delivery_id, "ok")
    r = await client.post("/fhir/$process-message", json=request, headers=integration(keys))
    assert r.status_code == 200, r.text
    answer = r.json()
    header = answer["entry"][0]["resource"]
    request_header = request["entry"][0]["resource"]
    assert request_header["id"] != request["id"]  # the header's id, not the Bundle's
    assert header["response"] == {"identifier": request_header["id"], "code": "ok"}
    assert header["source"]["endpoint"] == "https://brygga.test/fhir"
    nameless = copy.deepcopy(request)
    del nameless["entry"][0]["resource"]["id"]
    r = await client.post("/fhir/$process-message", json=nameless, headers=integration(keys))
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == [
        "Bundle.entry[0].resource.id"
    ]
    reports = validate([answer, request])
    assert reports[0].errors == [], reports[0].text()


def test_api_consents_pass_the_independent_validator() -> None:
    """What GET /fhir/Consent returns (gateway/model/consent.py to_fhir), as a collection."""
    from gateway.model.consent import Actor, ConsentRecord, from_fhir, to_fhir

    entries = []
    for n, basis in enumerate(sorted(CONSENT_POLICIES)):
        record = ConsentRecord(
            f"c-{n}",
            parse_identity_number(personnummer(4)),
            basis,
            "active",
            AT,
            (Actor("role", "hemtjanst"), Actor("org", HOME_CARE)),
            ("lus",),
            AT,
            None,
            None,
            "SE2321000016-L777",
            "Utlämnandet skadar inte patienten" if basis == "menprovning" else "",
        )
        resource = to_fhir(record)
        assert resource["policy"] and from_fhir(resource, f"c-{n}", AT) == record
        entries.append(
            {"fullUrl": f"urn:uuid:1b4f1c2e-0d1a-4c55-9a3e-2f7e0f0c0a1{n}", "resource": resource}
        )
    (report,) = validate([{"resourceType": "Bundle", "type": "collection", "entry": entries}])
    assert report.errors == [], report.text()


async def test_what_a_recipient_fhir_server_receives_passes() -> None:
    """Over the real FHIR channel (HTTP to a stand-in server): the Bundle as delivered, with
    the dedup key as Bundle.id and MessageHeader.id, and a withheld one."""
    from adapters.fhir.channel import FhirChannelSettings, FhirMessagingChannel
    from gateway.pipeline.channels import DeliveryContext
    from gateway.pipeline.ledger import State
    from tests.standins import FhirReceiver

    channel = FhirMessagingChannel(FhirChannelSettings(timeout_seconds=5))
    with FhirReceiver() as rx:
        for n, bundle in enumerate(
            [to_bundle(full_message()), withhold(to_bundle(full_message()), ["medication"])]
        ):
            context = DeliveryContext(
                delivery_id=f"d-{n}",
                message_id="m-1",
                recipient_hsa_id=HOME_CARE,
                bundle=bundle,
                address=rx.address,
                attempt=1,
                dedup_key=f"d-{n}",
            )
            assert (await channel.deliver(context)).state is State.RECEIVED
        received = list(rx.received)
    await channel.aclose()
    assert [b["entry"][0]["resource"]["id"] for b in received] == ["d-0", "d-1"]
    assert_valid(validate(received), ["delivered", "delivered withheld"])


SYSTEMS_RESERV = SYSTEMS[IdentifierKind.RESERVNUMMER]
STORED = sorted((Path(__file__).parent / "fhir_stored").glob("*.json"))


@pytest.mark.parametrize("path", STORED, ids=lambda p: p.stem)
def test_bundles_stored_before_read_as_the_regenerated_goldens(path: Path) -> None:
    """Real Bundles of the old layout (not converted here) against today's golden."""
    old = json.loads(path.read_text("utf-8"))
    new = json.loads((MAPPINGS_DIR / "takecare" / "golden" / path.name).read_text("utf-8"))
    was, now = read_bundle(old), read_bundle(new)
    # the folkbokföringsadress (PID-11) is carried since decision 0016: the old have none
    assert was.address is None
    now = replace(now, address=None, contents=now.contents - {"address"})
    # the one other intended difference: a regional reservnummer's system
    regional = {"urn:oid:1.2.752.97.3.1.3": SYSTEMS_RESERV}
    assert was.prior_identifiers == tuple((regional.get(s, s), v) for s, v in now.prior_identifiers)
    assert replace(was, prior_identifiers=()) == replace(now, prior_identifiers=())
    for kinds in (["medication"], ["nursing-referral"]):
        kept = withhold(old, kinds)
        index = resources_by_ref(kept)
        refs = re.findall(r'"reference": "([^"]+)"', json.dumps(kept))
        assert all(resolve(index, r) is not None for r in refs)  # nothing dangles
        assert read_bundle(kept) == read_bundle(withhold(new, [*kinds, "address"]))
    assert validate([old])[0].errors  # and the independent reader cannot resolve them


def test_a_consent_for_a_regional_reservnummer_keeps_its_system() -> None:
    from gateway.model.consent import from_fhir, to_fhir

    regional = "urn:oid:1.2.752.97.3.1.3"
    resource = {
        "resourceType": "Consent",
        "status": "active",
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "samtycke"}]}],
        "patient": {"identifier": {"system": regional, "value": "RES-1234"}},
        "provision": {"purpose": [{"system": PURPOSE_SYSTEM, "code": "lus"}]},
    }
    record = from_fhir(resource, "c-9", AT)
    assert record.patient == parse_reservnummer("RES-1234")  # the same patient key
    assert to_fhir(record)["patient"]["identifier"]["system"] == regional
