"""The consent gate: the rules as a table, FHIR Consent in and out, and the gate in the
pipeline (hold and release, withdrawal between routing and delivery, objection for one kind
of party, protected identity) against real databases."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from gateway import clock
from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.directory import Directory, Endpoint, Organisation
from gateway.model.bundle import CONSENT_BASIS_SYSTEM
from gateway.model.consent import (
    PURPOSE_SYSTEM,
    RECIPIENT_KIND_SYSTEM,
    Actor,
    ConsentInvalid,
    ConsentRecord,
    Outcome,
    Recipient,
    decide,
    from_fhir,
    to_fhir,
)
from gateway.model.events import LusEvent
from gateway.model.identifiers import (
    HSA_SYSTEM,
    SYSTEMS,
    parse_identity_number,
    parse_reservnummer,
)
from gateway.pipeline import gate
from gateway.pipeline.channels import ChannelRegistry, InboxChannel
from gateway.pipeline.channels import Outcome as Delivered
from gateway.pipeline.gate import delivery_event
from gateway.pipeline.ledger import State
from gateway.store.db import Database
from gateway.store.tables import audit_log, deliveries, outbox, receipt_events
from tests.inprocess import HOME_CARE, KEYER, NIGHT, REHAB, Pipeline, canonical, parties
from tests.support import personnummer

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
PATIENT = parse_identity_number(personnummer(70))
HOME = Recipient(HOME_CARE, "hemtjanst")
CLINIC = Recipient("SE2321000016-V010", "listed-clinic")
PNR_SYSTEM = SYSTEMS[PATIENT.kind]


def rec(
    basis: str = "samtycke",
    status: str = "active",
    *,
    at: datetime = NOW - timedelta(hours=1),
    actors: tuple[Actor, ...] = (),
    start: datetime | None = None,
    end: datetime | None = None,
    purposes: tuple[str, ...] = (),
    episode: str | None = None,
    rid: str = "c1",
) -> ConsentRecord:
    return ConsentRecord(
        rid, PATIENT, basis, status, at, actors, purposes, start, end, episode, "SE2321000016-L777"
    )


LATER = NOW - timedelta(minutes=5)
HOME_ONLY = (Actor("role", "hemtjanst"),)

# (case, records, recipient, expected outcome, expected rule)
TABLE: list[tuple[str, list[ConsentRecord], Recipient, Outcome, str]] = [
    ("consent present", [rec()], HOME, Outcome.PERMIT, "consent"),
    ("nothing recorded", [], HOME, Outcome.HOLD, "no-basis"),
    ("menprövning", [rec("menprovning")], HOME, Outcome.PERMIT, "menprovning"),
    ("objection", [rec("sparr")], HOME, Outcome.DENY, "objection"),
    (
        "objection beats consent",
        [rec(), rec("sparr", at=LATER, rid="c2")],
        HOME,
        Outcome.DENY,
        "objection",
    ),
    (
        "objection for home care only: home care",
        [rec(), rec("sparr", actors=HOME_ONLY, rid="c2")],
        HOME,
        Outcome.DENY,
        "objection",
    ),
    (
        "objection for home care only: the clinic",
        [rec(), rec("sparr", actors=HOME_ONLY, rid="c2")],
        CLINIC,
        Outcome.PERMIT,
        "consent",
    ),
    (
        "consent for one organisation only",
        [rec(actors=(Actor("org", CLINIC.hsa_id),))],
        HOME,
        Outcome.HOLD,
        "no-basis",
    ),
    ("consent withdrawn", [rec(status="inactive")], HOME, Outcome.DENY, "revoked"),
    (
        "withdrawn, then a newer consent",
        [rec(status="inactive"), rec(at=LATER, rid="c2")],
        HOME,
        Outcome.PERMIT,
        "consent",
    ),
    (
        "withdrawn after a menprövning",
        [rec("menprovning", rid="c2", at=NOW - timedelta(days=1)), rec(status="inactive")],
        HOME,
        Outcome.DENY,
        "revoked",
    ),
    ("expired period", [rec(end=NOW - timedelta(minutes=1))], HOME, Outcome.HOLD, "expired"),
    ("period not begun", [rec(start=NOW + timedelta(days=1))], HOME, Outcome.HOLD, "not-yet-valid"),
    (
        "period running",
        [rec(start=NOW - timedelta(days=1), end=NOW + timedelta(days=1))],
        HOME,
        Outcome.PERMIT,
        "consent",
    ),
    (
        "objection expired",
        [rec(), rec("sparr", end=NOW - timedelta(minutes=1), rid="c2")],
        HOME,
        Outcome.PERMIT,
        "consent",
    ),
    ("entered in error", [rec(status="entered-in-error")], HOME, Outcome.HOLD, "no-basis"),
    ("other purpose only (SIP)", [rec(purposes=("sip",))], HOME, Outcome.HOLD, "no-basis"),
    ("another stay's consent", [rec(episode="other-stay")], HOME, Outcome.HOLD, "no-basis"),
]


@pytest.mark.parametrize(
    ("case", "records", "who", "outcome", "rule"), TABLE, ids=[t[0] for t in TABLE]
)
def test_gate_rules(
    case: str, records: list[ConsentRecord], who: Recipient, outcome: Outcome, rule: str
) -> None:
    decision = decide(records, who, "lus", NOW, "this-stay")
    assert (decision.outcome, decision.rule) == (outcome, rule), case
    assert decision.reason  # every decision says why, in Swedish


# --------------------------------------------------------------------------- FHIR Consent


def fhir(**changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "status": "active",
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "samtycke"}]}],
        "patient": {"identifier": {"system": PNR_SYSTEM, "value": PATIENT.value}},
        "dateTime": "2026-11-23T09:00:00+01:00",
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "reference": {
                        "identifier": {"system": RECIPIENT_KIND_SYSTEM, "value": "hemtjanst"}
                    }
                },
                {"reference": {"identifier": {"system": HSA_SYSTEM, "value": CLINIC.hsa_id}}},
            ],
            "purpose": [{"system": PURPOSE_SYSTEM, "code": "lus"}],
            "period": {"start": "2026-11-23T09:00:00+01:00"},
        },
    }
    resource.update(changes)
    return resource


def test_fhir_consent_round_trips() -> None:
    record = from_fhir(fhir(), "id-1", NOW)
    assert record.actors == (Actor("role", "hemtjanst"), Actor("org", CLINIC.hsa_id))
    assert record.purposes == ("lus",) and record.basis == "samtycke"
    again = from_fhir(to_fhir(record), "id-1", NOW)
    assert again == record


BAD = [
    ({"resourceType": "Patient"}, "Consent"),
    ({"status": "maybe"}, "Consent.status"),
    ({"patient": {"reference": "Patient/1"}}, "Consent.patient.identifier"),
    (
        {"patient": {"identifier": {"system": PNR_SYSTEM, "value": "191212121213"}}},
        "Consent.patient.identifier.value",
    ),
    (
        {"patient": {"identifier": {"system": "urn:other", "value": "x"}}},
        "Consent.patient.identifier.system",
    ),
    ({"category": []}, "Consent.category"),
    (
        {"category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "kanske"}]}]},
        "Consent.category.coding.code",
    ),
    ({"provision": {"type": "deny"}}, "Consent.provision.type"),
    (
        {
            "provision": {
                "actor": [{"reference": {"identifier": {"system": HSA_SYSTEM, "value": "nej"}}}]
            }
        },
        "Consent.provision.actor[0].reference.identifier.value",
    ),
    (
        {
            "provision": {
                "actor": [
                    {
                        "reference": {
                            "identifier": {"system": RECIPIENT_KIND_SYSTEM, "value": "tandvard"}
                        }
                    }
                ]
            }
        },
        "Consent.provision.actor[0].reference.identifier.value",
    ),
    (
        {"provision": {"purpose": [{"system": PURPOSE_SYSTEM, "code": "forskning"}]}},
        "Consent.provision.purpose[0]",
    ),
    ({"provision": {"period": {"start": "2026-11-23T09:00:00"}}}, "Consent.provision.period.start"),
    (
        {
            "provision": {
                "period": {"start": "2026-11-24T09:00:00+01:00", "end": "2026-11-23T09:00:00+01:00"}
            }
        },
        "Consent.provision.period",
    ),
    (
        {"category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "menprovning"}]}]},
        "Consent.performer",
    ),
    (
        {
            "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "menprovning"}]}],
            "performer": [{"identifier": {"system": HSA_SYSTEM, "value": "SE2321000016-L777"}}],
        },
        "Consent.extension",
    ),
]


@pytest.mark.parametrize(("change", "path"), BAD, ids=[p for _, p in BAD])
def test_an_unusable_consent_names_the_element(change: dict[str, Any], path: str) -> None:
    with pytest.raises(ConsentInvalid) as caught:
        from_fhir(fhir(**change), "id", NOW)
    assert caught.value.path == path
    assert PATIENT.value not in str(caught.value)


@given(
    basis=st.sampled_from(["samtycke", "menprovning", "sparr"]),
    status=st.sampled_from(["active", "inactive", "rejected"]),
    kinds=st.lists(st.sampled_from(["hemtjanst", "sabo", "rehab", "bistand"]), unique=True),
    days=st.one_of(st.none(), st.integers(1, 400)),
)
def test_any_valid_consent_survives_the_round_trip(
    basis: str, status: str, kinds: list[str], days: int | None
) -> None:
    record = ConsentRecord(
        "id",
        PATIENT,
        basis,
        status,
        NOW,
        tuple(Actor("role", k) for k in kinds),
        ("lus",),
        NOW,
        NOW + timedelta(days=days) if days else None,
        None,
        "SE2321000016-L777",
        "Utlämnandet skadar inte patienten" if basis == "menprovning" else "",
    )
    assert from_fhir(json.loads(json.dumps(to_fhir(record))), "id", NOW) == record


# --------------------------------------------------------------------------- in the pipeline


async def api_consent(db: Database, n: int, **changes: Any) -> gate.StoredConsent:
    """What POST /fhir/Consent does, for patient n."""
    pid = parse_identity_number(personnummer(n))
    resource = fhir(
        patient={"identifier": {"system": SYSTEMS[pid.kind], "value": pid.value}}, **changes
    )
    record = from_fhir(
        resource, changes.pop("rid", None) or f"00000000-0000-4000-8000-{n:012d}", clock.now()
    )
    async with db.transaction() as conn:
        return await gate.store(
            conn,
            record,
            patient_key=KEYER.key(pid.system, pid.value),
            source="api",
            source_id="SE2321000016-H001",
        )


async def sender_receipts(db: Database, message_id: str) -> list[tuple[str, str]]:
    """(state, detail) of every receipt the sender is told about, in order."""
    async with db.read() as conn:
        payloads = (
            (
                await conn.execute(
                    select(outbox.c.payload)
                    .where(outbox.c.topic == topics.RECEIPTS)
                    .order_by(outbox.c.id)
                )
            )
            .scalars()
            .all()
        )
        details = dict(
            (
                await conn.execute(
                    select(
                        receipt_events.c.delivery_id.concat(":").concat(receipt_events.c.state),
                        receipt_events.c.detail,
                    )
                )
            ).all()
        )
    events = [Event.from_json(p) for p in payloads]
    return [
        (e.data["state"], details.get(f"{e.delivery_id}:{e.data['state']}") or "")
        for e in events
        if e.message_id == message_id and e.type == "receipt.recorded"
    ]


async def test_absent_then_arriving_consent_releases_the_held_deliveries(db: Database) -> None:
    pipeline = Pipeline(db)
    message = canonical(71, consent=None, parties=parties(HOME_CARE))
    mid = await pipeline.route_message(message, "G-1")
    assert set((await pipeline.states(mid)).values()) == {"held"}
    assert await pipeline.status(mid) == "held"
    # The sender hears at once why nothing was delivered.
    assert ("held", "Väntar på samtycke (regel: no-basis)") in await sender_receipts(db, mid)

    stored = await api_consent(db, 71, provision={"type": "permit"})  # every recipient
    assert stored.version == 1
    assert set((await pipeline.states(mid)).values()) == {"routed"}
    assert await pipeline.status(mid) == "routed"
    await pipeline.deliver_routed(mid)
    assert set((await pipeline.states(mid)).values()) == {"delivered"}
    # Each decision is in the audit trail (two recipients: the listed clinic and home care),
    # by pseudonym, with the rule that decided.
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(audit_log.c.outcome, audit_log.c.detail, audit_log.c.patient_key)
                .where(audit_log.c.action == "gate.decision")
                .order_by(audit_log.c.seq)
            )
        ).all()
    assert [(r.outcome, r.detail.split(",")[0]) for r in rows] == [
        ("hold", "regel no-basis"),
        ("hold", "regel no-basis"),
        ("permit", "regel consent"),
        ("permit", "regel consent"),
    ]
    assert all(r.patient_key and personnummer(71) not in r.detail for r in rows)


async def test_consent_for_home_care_releases_only_home_care(db: Database) -> None:
    pipeline = Pipeline(db)
    message = canonical(72, consent=None, parties=parties(HOME_CARE, REHAB))
    mid = await pipeline.route_message(message, "G-2")
    await api_consent(
        db,
        72,
        provision={
            "type": "permit",
            "actor": [
                {
                    "reference": {
                        "identifier": {"system": RECIPIENT_KIND_SYSTEM, "value": "hemtjanst"}
                    }
                }
            ],
        },
    )
    states = await pipeline.states(mid)
    assert states.pop(HOME_CARE) == "routed"
    assert set(states.values()) == {"held"}  # the clinic and rehab still wait


async def test_consent_withdrawn_between_routing_and_delivery_is_denied(db: Database) -> None:
    pipeline = Pipeline(db)
    stored = await api_consent(db, 73)
    message = canonical(73, consent=None, parties=parties(HOME_CARE))
    mid = await pipeline.route_message(message, "G-3")
    assert (await pipeline.states(mid))[HOME_CARE] == "routed"
    withdrawn = await api_consent(db, 73, status="inactive", rid=stored.record.id)
    assert withdrawn.version == 2
    await pipeline.deliver_routed(mid)
    assert (await pipeline.states(mid))[HOME_CARE] == "denied"
    denial = ("denied", "Patienten har återkallat sitt samtycke (regel: revoked)")
    assert denial in await sender_receipts(db, mid)
    async with db.read() as conn:
        from gateway.pipeline import inbox

        assert await inbox.list_notices(conn, HOME_CARE) == []


def planning(n: int, visit: str) -> Any:
    """A follow-up of stay ``visit`` without a consent segment of its own."""
    return canonical(
        n,
        consent=None,
        event=LusEvent.PLANERINGSUNDERLAG,
        encounter_id=visit,
        parties=parties(HOME_CARE),
    )


async def test_objection_in_the_message_denies_and_inherits_to_follow_ups(db: Database) -> None:
    pipeline = Pipeline(db)

    async def states(message_id: str) -> set[str]:
        return set((await pipeline.states(message_id)).values())

    admit = await pipeline.run(
        canonical(74, consent="sparr", encounter_id="V1", parties=parties(HOME_CARE)), "G-4"
    )
    assert await states(admit) == {"denied"}
    assert await pipeline.status(admit) == "denied"
    # A follow-up of the same stay carries no consent segment: the objection still holds.
    assert await states(await pipeline.run(planning(74, "V1"), "G-5")) == {"denied"}
    # ... and a consent given at admission carries to the stay's follow-ups.
    admit2 = await pipeline.run(canonical(75, encounter_id="V2", parties=parties(HOME_CARE)), "G-6")
    assert await states(admit2) == {"delivered"}
    assert await states(await pipeline.run(planning(75, "V2"), "G-7")) == {"delivered"}
    # ... but not to the patient's next stay.
    assert await states(await pipeline.route_message(planning(75, "V3"), "G-8")) == {"held"}


async def test_a_consent_in_a_later_message_releases_an_earlier_held_one(db: Database) -> None:
    pipeline = Pipeline(db)
    early = await pipeline.route_message(planning(76, "V1"), "G-9")
    assert set((await pipeline.states(early)).values()) == {"held"}
    await pipeline.run(
        canonical(76, consent="menprovning", encounter_id="V1", parties=parties(HOME_CARE)), "G-10"
    )
    assert set((await pipeline.states(early)).values()) == {"routed"}


class PaperChannel:
    """Stands for fax or letter: an address on paper, never for protected identity."""

    name = "fax"
    protected_identity = False
    application_receipts = False

    async def deliver(self, ctx: Any) -> Delivered:
        return Delivered(State.DELIVERED, "Faxat")


async def test_protected_identity_goes_only_by_approved_channels(db: Database) -> None:
    pipeline = Pipeline(db)
    channels = ChannelRegistry([PaperChannel(), InboxChannel()])
    directory = Directory(
        [
            Organisation(
                HOME_CARE,
                "Hemtjänst som föredrar fax",
                "home-care",
                "",
                (Endpoint("fax", "+4686000000"), Endpoint("inbox")),
            ),
            Organisation(
                NIGHT, "Nattpatrull med bara fax", "home-care", "", (Endpoint("fax", "+4686"),)
            ),
        ]
    )
    pipeline.route.directory, pipeline.route.channels = directory, channels
    pipeline.deliver.channels = channels
    plain = await pipeline.run(canonical(77, parties=parties(HOME_CARE, NIGHT)), "G-11")
    hidden = await pipeline.run(
        canonical(78, protected=True, parties=parties(HOME_CARE, NIGHT)), "G-12"
    )
    async with db.read() as conn:
        from gateway.store.tables import deliveries

        rows = (
            await conn.execute(
                select(
                    deliveries.c.message_id,
                    deliveries.c.recipient_hsa_id,
                    deliveries.c.channel,
                    deliveries.c.state,
                    deliveries.c.detail,
                )
            )
        ).all()
    by = {(r.message_id, r.recipient_hsa_id): r for r in rows}
    assert by[(plain, HOME_CARE)].channel == "fax" and by[(plain, NIGHT)].channel == "fax"
    assert by[(hidden, HOME_CARE)].channel == "inbox"
    assert by[(hidden, NIGHT)].state == "failed"
    assert "Skyddad identitet" in by[(hidden, NIGHT)].detail


async def test_an_objection_after_a_merge_stops_a_delivery_queued_under_the_old_identity(
    db: Database,
) -> None:
    """A delivery routed under a reservnummer, whose event still carries the old Kafka key,
    meets the objection recorded under the merged personnummer."""
    pipeline = Pipeline(db)
    reserv = parse_reservnummer("RES-0081-2026")
    first = canonical(81, parties=parties(HOME_CARE))
    first.patient_ids[:] = [reserv]
    mid = await pipeline.route_message(first, "G-13")
    delivery_id = next(d for d, s in (await _delivery_states(db, mid)).items() if s == "routed")
    old_key = KEYER.key(reserv.system, reserv.value)

    merge = replace(
        canonical(81, event=LusEvent.PATIENTSAMMANSLAGNING, parties=[]),
        listed_clinic=None,
        replaces_ids=[reserv],
    )
    await pipeline.run(merge, "G-14")
    await api_consent(
        db,
        81,
        category=[{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "sparr"}]}],
        provision={"type": "deny"},
    )
    async with db.transaction() as conn:
        await pipeline.deliver.handle(conn, delivery_event(mid, delivery_id), old_key)
    assert (await _delivery_states(db, mid))[delivery_id] == "denied"


async def _delivery_states(db: Database, message_id: str) -> dict[str, str]:
    async with db.read() as conn:
        rows = await conn.execute(
            select(deliveries.c.id, deliveries.c.state).where(deliveries.c.message_id == message_id)
        )
        return {r.id: r.state for r in rows}
