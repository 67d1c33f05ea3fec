"""What comes back: the parties' return messages (kvittens, fast vårdkontakt, SIP, requests
for information and answers, deviations, services started), tied to the stay they answer.

A party answers a notice it received (a delivery: the MessageHeader.id the gateway sent, or
the inbox notice id). The return is stored as a message of its own, in the same table and
encrypted the same way as the hospital's, as a FHIR message Bundle built from the stay's
Bundle (patient, encounter, care team, consent) plus a ``Communication`` with what the
party said. From there it takes the ordinary path (consent gate, routing with
``mappings/routing/returns.toml``, deliveries with receipt clocks), and the receipts adapter
sends it back to the ward (adapters/takecare/receipts.py). Decision 0018 says why.
"""

from __future__ import annotations

import functools
import json
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.crypto.columns import seal_row
from gateway.model.bundle import (
    DEFAULT_SOURCE_ENDPOINT,
    _full_url_of,
    _org,
    _org_id,
    bundle_json,
    read_bundle,
    resolve,
    resources_by_ref,
)
from gateway.model.events import LUS_EVENT_SYSTEM, LusEvent
from gateway.model.identifiers import HSA_SYSTEM
from gateway.pipeline import deviations, ledger
from gateway.pipeline.consent import accepted_event
from gateway.pipeline.ledger import Actor, State
from gateway.store.tables import deliveries, messages
from mappings import MAPPINGS_DIR

RETURNS_FILE = MAPPINGS_DIR / "routing" / "returns.toml"
NEED_SYSTEM = "https://brygga.dev/fhir/CodeSystem/lus-need"
DEVIATION_CATEGORY_SYSTEM = "https://brygga.dev/fhir/CodeSystem/lus-deviation-category"
# The notice a return answers (a delivery id, which is the MessageHeader.id the gateway
# sent), and a message of the gateway (its Bundle.id): Communication.about / inResponseTo.
NOTICE_SYSTEM = "https://brygga.dev/fhir/sid/notice"
MESSAGE_SYSTEM = "https://brygga.dev/fhir/sid/message"
REPORTED_KIND = "reported"
deviations.KINDS.setdefault(REPORTED_KIND, "Avvikelse rapporterad av en part")
_KEPT = frozenset({"Patient", "Encounter", "Organization", "CareTeam", "Consent"})
TEXT_MAX = 4000


@dataclass(frozen=True, slots=True)
class ReturnRules:
    """``[returns]`` of returns.toml: what a party may send and what goes back to the ward."""

    accepted: frozenset[LusEvent]
    to_ward: frozenset[LusEvent]
    answer_to_asker: bool
    needs: dict[str, str]
    categories: dict[str, str]
    receipts: dict[str, str]  # event -> rule of mappings/deadlines: the receipt clock

    @classmethod
    def load(cls, path: Path = RETURNS_FILE) -> ReturnRules:
        data = tomllib.loads(path.read_text(encoding="utf-8"))["returns"]
        return cls(
            frozenset(LusEvent(e) for e in data["accepted"]),
            frozenset(LusEvent(e) for e in data["to_ward"]),
            bool(data.get("answer_to_asker", True)),
            dict(data["needs"]),
            dict(data["deviation_categories"]),
            {str(k): str(v) for k, v in data.get("receipts", {}).items()},
        )


@functools.cache
def rules() -> ReturnRules:
    return ReturnRules.load()


class ReturnInvalid(Exception):
    """A return message the gateway cannot take: ``expression`` names the element. The text
    never carries what the sender wrote (it may be patient data)."""

    def __init__(self, expression: str, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.expression = expression
        self.text = text
        self.status = status


@dataclass(frozen=True, slots=True)
class Contact:
    """The fast vårdkontakt primary care names (001:2847-2855)."""

    name: str
    title: str
    phone: str


@dataclass(frozen=True, slots=True)
class ReturnMessage:
    """What a party said, in the gateway's terms; both entry points build it."""

    event: LusEvent
    notice_id: str
    text: str = field(default="", repr=False)
    needs: tuple[str, ...] = ()
    contact: Contact | None = field(default=None, repr=False)
    sip_at: datetime | None = None
    category: str = ""
    answers: str = ""  # informationssvar: the message id of the request it answers
    person: Actor | None = field(default=None, repr=False)
    answers_at: str = "answers"  # where the caller gives ``answers``, for an error


def _text(value: Any, where: str, *, required: bool = False, limit: int = TEXT_MAX) -> str:
    if value is None or value == "":
        if required:
            raise ReturnInvalid(where, "is required")
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ReturnInvalid(where, f"must be text of at most {limit} characters")
    return value.strip()


def _when(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise ReturnInvalid(where, "must be a date and time with a time zone (ISO 8601)")
    return at


def _check(ret: ReturnMessage, where: dict[str, str]) -> ReturnMessage:
    """What each kind must carry; ``where`` names each element in the caller's format."""
    r = rules()
    if ret.event not in r.accepted:
        raise ReturnInvalid(where["event"], "is not a message a party sends back")
    for i, code in enumerate(ret.needs):
        if code not in r.needs:
            raise ReturnInvalid(f"{where['needs']}[{i}]", f"is not one of {sorted(r.needs)}")
    if ret.event is LusEvent.KVITTENS and not (ret.needs or ret.text):
        raise ReturnInvalid(where["needs"], "a kvittens gives the current needs (or a text)")
    if ret.event is LusEvent.FAST_VARDKONTAKT:
        if ret.contact is None or not (ret.contact.name and ret.contact.title):
            raise ReturnInvalid(where["contact"], "name, title and direct phone are required")
        if not ret.contact.phone or not any(c.isdigit() for c in ret.contact.phone):
            raise ReturnInvalid(where["phone"], "a direct phone number is required")
    if ret.event is LusEvent.KALLELSE_SIP and ret.sip_at is None:
        raise ReturnInvalid(where["sip_at"], "an invitation gives the time of the SIP meeting")
    if ret.event is LusEvent.AVVIKELSE and ret.category not in r.categories:
        raise ReturnInvalid(where["category"], f"must be one of {sorted(r.categories)}")
    if (
        ret.event
        in (
            LusEvent.INFORMATIONSBEGARAN,
            LusEvent.INFORMATIONSSVAR,
            LusEvent.SIP_PLAN,
        )
        and not ret.text
    ):
        raise ReturnInvalid(where["text"], "is required for this message")
    return ret


_JSON_WHERE = {
    "event": "kind",
    "needs": "needs",
    "contact": "contact",
    "phone": "contact.phone",
    "sip_at": "sip_at",
    "category": "category",
    "answers": "answers",
    "text": "text",
}


def from_json(kind: str, notice_id: str, body: Any, person: Actor) -> ReturnMessage:
    """The inbox API's body (the person is the token's, never the body's)."""
    try:
        event = LusEvent(kind)
    except ValueError:
        raise ReturnInvalid("kind", "is not a message a party sends back", 404) from None
    if not isinstance(body, dict):
        raise ReturnInvalid("$", "the body must be a JSON object")
    needs = body.get("needs") or []
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise ReturnInvalid("needs", "must be a list of codes")
    contact = body.get("contact")
    if contact is not None and not isinstance(contact, dict):
        raise ReturnInvalid("contact", "must be an object with name, title and phone")
    ret = ReturnMessage(
        event=event,
        notice_id=notice_id,
        text=_text(body.get("text"), "text"),
        needs=tuple(needs),
        contact=Contact(
            _text(contact.get("name"), "contact.name", limit=200),
            _text(contact.get("title"), "contact.title", limit=200),
            _text(contact.get("phone"), "contact.phone", limit=40),
        )
        if contact
        else None,
        sip_at=_when(body.get("sip_at"), "sip_at"),
        category=_text(body.get("category"), "category", limit=60),
        answers=_text(body.get("answers"), "answers", limit=36),
        person=person,
    )
    return _check(ret, _JSON_WHERE)


_COMM = "Bundle.entry.resource.where(resourceType='Communication')"
_FHIR_WHERE = {
    "event": "Bundle.entry[0].resource.eventCoding",
    "needs": f"{_COMM}.reasonCode",
    "contact": "Bundle.entry.resource.where(resourceType='PractitionerRole')",
    "phone": "Bundle.entry.resource.where(resourceType='PractitionerRole').telecom",
    "sip_at": "Bundle.entry.resource.where(resourceType='Appointment').requestedPeriod.start",
    "category": f"{_COMM}.reasonCode",
    "answers": f"{_COMM}.inResponseTo",
    "text": f"{_COMM}.payload.contentString",
}


def is_return_request(header: dict[str, Any]) -> bool:
    """A message Bundle that is not a response, with a return event: a party's message."""
    coding = header.get("eventCoding") or {}
    return (
        "response" not in header
        and coding.get("system") == LUS_EVENT_SYSTEM
        and coding.get("code") in {e.value for e in rules().accepted}
    )


def _identifier(refs: Any, system: str) -> str:
    for ref in refs if isinstance(refs, list) else []:
        ident = ref.get("identifier") if isinstance(ref, dict) else None
        if isinstance(ident, dict) and ident.get("system") == system:
            return str(ident.get("value") or "")
    return ""


def _person(index: dict[str, dict[str, Any]], ref: Any) -> tuple[Actor | None, Contact | None]:
    """A PractitionerRole (name from its Practitioner, title from code.text, phone)."""
    role = resolve(index, ref)
    if not role or role.get("resourceType") != "PractitionerRole":
        return None, None
    who = resolve(index, role.get("practitioner")) or {}
    names = who.get("name") or [{}]
    name = str(
        names[0].get("text")
        or " ".join([*names[0].get("given", []), names[0].get("family", "")]).strip()
    )
    title = str(((role.get("code") or [{}])[0]).get("text") or "")
    phone = next(
        (str(t.get("value")) for t in role.get("telecom", []) if t.get("system") == "phone"), ""
    )
    return Actor(name=name, role=title), Contact(name, title, phone)


def from_fhir(bundle: dict[str, Any], header: dict[str, Any]) -> ReturnMessage:
    """A recipient system's message Bundle: MessageHeader.focus names a Communication whose
    ``about`` identifies the notice (system NOTICE_SYSTEM, the MessageHeader.id it got)."""
    index = resources_by_ref(bundle)
    comm = next(
        (
            r
            for f in header.get("focus") or []
            if (r := resolve(index, f)) and r.get("resourceType") == "Communication"
        ),
        None,
    )
    if comm is None:
        raise ReturnInvalid(
            "Bundle.entry[0].resource.focus", "the MessageHeader's focus must be a Communication"
        )
    notice = _identifier(comm.get("about"), NOTICE_SYSTEM)
    if not notice:
        raise ReturnInvalid(f"{_COMM}.about", f"must identify the notice ({NOTICE_SYSTEM})")
    codes = [
        c
        for rc in comm.get("reasonCode") or []
        for c in (rc.get("coding") or [] if isinstance(rc, dict) else [])
        if isinstance(c, dict)
    ]
    event = LusEvent(header["eventCoding"]["code"])
    raw_payload = comm.get("payload")
    payload = (
        [p for p in raw_payload if isinstance(p, dict)] if isinstance(raw_payload, list) else []
    )
    person, _ = _person(index, comm.get("sender"))
    contact = None
    if event is LusEvent.FAST_VARDKONTAKT:
        target = next(
            (
                r
                for p in payload
                if (r := resolve(index, p.get("contentReference")))
                and r.get("resourceType") == "PractitionerRole"
            ),
            None,
        )
        if target is None:
            raise ReturnInvalid(_FHIR_WHERE["contact"], "the payload names the PractitionerRole")
        _, contact = _person(index, {"reference": _ref_of(index, target)})
    appointment = next(
        (
            r
            for p in payload
            if (r := resolve(index, p.get("contentReference")))
            and r.get("resourceType") == "Appointment"
        ),
        None,
    )
    text = "\n".join(str(p["contentString"]) for p in payload if p.get("contentString"))
    ret = ReturnMessage(
        event=event,
        notice_id=notice,
        text=_text(text, _FHIR_WHERE["text"]),
        needs=tuple(str(c.get("code")) for c in codes if c.get("system") == NEED_SYSTEM),
        contact=contact,
        sip_at=_when(_sip_start(appointment), _FHIR_WHERE["sip_at"]) if appointment else None,
        category=next(
            (str(c.get("code")) for c in codes if c.get("system") == DEVIATION_CATEGORY_SYSTEM),
            "",
        ),
        answers=_identifier(comm.get("inResponseTo"), MESSAGE_SYSTEM),
        person=person,
        answers_at=_FHIR_WHERE["answers"],
    )
    return _check(ret, _FHIR_WHERE)


def _sip_start(appointment: dict[str, Any]) -> Any:
    periods = appointment.get("requestedPeriod") or [{}]
    return periods[0].get("start") if isinstance(periods[0], dict) else None


def _ref_of(index: dict[str, dict[str, Any]], resource: dict[str, Any]) -> str:
    return next(k for k, v in index.items() if v is resource)


@dataclass(frozen=True, slots=True)
class Stored:
    message_id: str
    patient_key: str
    duplicate: bool


async def accept(
    conn: AsyncConnection,
    ret: ReturnMessage,
    org: str,
    org_name: str,
    *,
    source: str,
    control_id: str,
    raw: bytes,
    endpoint: str = DEFAULT_SOURCE_ENDPOINT,
) -> Stored:
    """Store a party's return message and start it on its way, in the caller's transaction.

    Raises :class:`ReturnInvalid` (404) when ``org`` did not receive the notice, so that a
    notice of another organisation does not show that it exists."""
    duplicate = (
        await conn.execute(
            select(messages.c.id, messages.c.patient_key).where(
                messages.c.source == source, messages.c.control_id == control_id
            )
        )
    ).first()
    if duplicate is not None:
        return Stored(duplicate.id, duplicate.patient_key, True)
    notice = (
        await conn.execute(
            select(
                deliveries.c.message_id,
                deliveries.c.recipient_hsa_id,
                deliveries.c.municipality,
                deliveries.c.district,
                messages.c.patient_key,
                messages.c.episode_key,
                messages.c.canonical,
            )
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(deliveries.c.id == ret.notice_id)
        )
    ).one_or_none()
    if notice is None or notice.recipient_hsa_id != org:
        raise ReturnInvalid("notice", "no notice with this id was sent to your organisation", 404)
    original, original_id = json.loads(notice.canonical), notice.message_id
    if is_return(original):
        # A reply to a party's message (the ward answering a request in its inbox): the stay
        # is the one that message answers, and an answer answers that request.
        if ret.event is LusEvent.INFORMATIONSSVAR and not ret.answers:
            if read_bundle(original).event is LusEvent.INFORMATIONSBEGARAN:
                ret = replace(ret, answers=notice.message_id)
        original_id = answered_message(original)
        root = (
            await conn.execute(select(messages.c.canonical).where(messages.c.id == original_id))
        ).one()
        original = json.loads(root.canonical)
    if ret.event is LusEvent.INFORMATIONSSVAR and not ret.answers:
        raise ReturnInvalid(ret.answers_at, "an answer names the request it answers")
    ward = read_bundle(original).sender_hsa_id
    asker = ""
    if ret.answers:
        asked = (
            await conn.execute(
                select(messages.c.canonical).where(
                    messages.c.id == ret.answers,
                    messages.c.patient_key == notice.patient_key,
                    messages.c.event == LusEvent.INFORMATIONSBEGARAN.value,
                )
            )
        ).one_or_none()
        if asked is None:
            raise ReturnInvalid(
                ret.answers_at, "no request for information of this stay has this id"
            )
        asker = read_bundle(json.loads(asked.canonical)).sender_hsa_id
    message_id = str(uuid.uuid4())
    now = clock.now()
    bundle = build_bundle(original, original_id, ret, message_id, org, org_name, now, endpoint)
    # Named beyond the rules: the ward, for a request (its staff answer it in the inbox), and
    # the party that asked, for an answer.
    named = ward if ret.event is LusEvent.INFORMATIONSBEGARAN else asker
    if named and named != org and (named == ward or rules().answer_to_asker):
        comm = _communication(bundle)
        comm["recipient"] = [{"identifier": {"system": HSA_SYSTEM, "value": named}}]
    row = {
        "id": message_id,
        "source": source,
        "control_id": control_id,
        "event": ret.event.value,
        "patient_key": notice.patient_key,
        "episode_key": notice.episode_key,
        "raw": raw,
        "canonical": bundle_json(bundle),
        "ack": None,
        "status": "accepted",
        "received_at": now,
        "updated_at": now,
    }
    await conn.execute(messages.insert().values(seal_row(messages, row)))
    await enqueue(conn, topics.EVENTS, notice.patient_key, accepted_event(message_id))
    if ret.event is LusEvent.KVITTENS:
        # A person's kvittens acknowledges the notice; a system without a person only proves
        # that its application took it.
        person = ret.person if ret.person and ret.person.name else None
        await ledger.record(
            conn,
            ret.notice_id,
            notice.message_id,
            notice.patient_key,
            State.ACKNOWLEDGED if person else State.RECEIVED,
            actor=Actor(person.name, person.role, org) if person else None,
            detail="" if person else "Kvittens från mottagarens system (ingen person angiven)",
        )
    if ret.event is LusEvent.AVVIKELSE:
        await deviations.raise_deviation(
            conn,
            deviations.NewDeviation(
                message_id=message_id,
                delivery_id=None,
                patient_key=notice.patient_key,
                kind=REPORTED_KIND,
                responsible_hsa_id=ward,
                municipality=notice.municipality or "",
                district=notice.district or "",
                summary=f"{rules().categories[ret.category]} (rapporterad av {org})",
            ),
            now,
        )
    return Stored(message_id, notice.patient_key, False)


def _communication(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Communication"
    )


def build_bundle(
    original: dict[str, Any],
    original_id: str,
    ret: ReturnMessage,
    message_id: str,
    org: str,
    org_name: str,
    now: datetime,
    endpoint: str = DEFAULT_SOURCE_ENDPOINT,
) -> dict[str, Any]:
    """The return as a FHIR message Bundle: the stay's patient, encounter, parties and
    consent (as the original carried them), the sender, and a Communication."""
    kept = [e for e in original.get("entry", []) if e["resource"]["resourceType"] in _KEPT]
    urls = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["fullUrl"] for e in kept}

    def ref(rtype: str, rid: str) -> dict[str, str]:
        return {"reference": urls.get(f"{rtype}/{rid}") or _full_url_of(message_id, rtype, rid)}

    entries = list(kept)
    sender_key = f"Organization/{_org_id(org)}"
    if sender_key not in urls:
        entries.append(
            {
                "fullUrl": _full_url_of(message_id, "Organization", _org_id(org)),
                "resource": _org(org, org_name),
            }
        )
    extra: list[dict[str, Any]] = []
    comm: dict[str, Any] = {
        "resourceType": "Communication",
        "id": "return",
        "status": "completed",
        "category": [
            {
                "coding": [
                    {
                        "system": LUS_EVENT_SYSTEM,
                        "code": ret.event.value,
                        "display": ret.event.display,
                    }
                ]
            }
        ],
        "subject": ref("Patient", "patient"),
        "encounter": ref("Encounter", "encounter"),
        "sent": now.isoformat(),
        "about": [
            {"identifier": {"system": NOTICE_SYSTEM, "value": ret.notice_id}},
            {"identifier": {"system": MESSAGE_SYSTEM, "value": original_id}},
        ],
    }
    if ret.answers:
        comm["inResponseTo"] = [{"identifier": {"system": MESSAGE_SYSTEM, "value": ret.answers}}]
    reasons = [
        {"coding": [{"system": NEED_SYSTEM, "code": c, "display": rules().needs[c]}]}
        for c in ret.needs
    ]
    if ret.category:
        label = rules().categories[ret.category]
        reasons.append(
            {
                "coding": [
                    {"system": DEVIATION_CATEGORY_SYSTEM, "code": ret.category, "display": label}
                ]
            }
        )
    if reasons:
        comm["reasonCode"] = reasons
    payload: list[dict[str, Any]] = []
    if ret.text:
        payload.append({"contentString": ret.text})
    if ret.person and ret.person.name:
        extra += _practitioner("person", ret.person.name, ret.person.role, "", ref, org)
        comm["sender"] = ref("PractitionerRole", "person-role")
    else:
        comm["sender"] = ref("Organization", _org_id(org))
    if ret.contact:
        c = ret.contact
        extra += _practitioner("contact", c.name, c.title, c.phone, ref, org)
        payload.append({"contentReference": ref("PractitionerRole", "contact-role")})
    if ret.sip_at:
        extra.append(
            {
                "resourceType": "Appointment",
                "id": "sip",
                # An invitation proposes the meeting: its time as the requested period
                "status": "proposed",
                "description": "Samordnad individuell plan (SIP)",
                "requestedPeriod": [{"start": ret.sip_at.isoformat()}],
                "participant": [{"actor": ref("Patient", "patient"), "status": "needs-action"}],
            }
        )
        payload.append({"contentReference": ref("Appointment", "sip")})
    if payload:
        comm["payload"] = payload
    header = {
        "resourceType": "MessageHeader",
        "id": message_id,
        "eventCoding": {
            "system": LUS_EVENT_SYSTEM,
            "code": ret.event.value,
            "display": ret.event.display,
        },
        "source": {"endpoint": endpoint},
        "sender": ref("Organization", _org_id(org)),
        "focus": [
            ref("Communication", "return"),
            ref("Encounter", "encounter"),
            *(
                ref(e["resource"]["resourceType"], e["resource"]["id"])
                for e in kept
                if e["resource"]["resourceType"] in ("CareTeam", "Consent")
            ),
        ],
    }
    for resource in (header, comm, *extra):
        entries.append(
            {
                "fullUrl": _full_url_of(message_id, resource["resourceType"], resource["id"]),
                "resource": resource,
            }
        )
    entries.sort(key=lambda e: e["resource"]["resourceType"] != "MessageHeader")
    return {
        "resourceType": "Bundle",
        "id": message_id,
        "type": "message",
        "timestamp": now.isoformat(),
        "entry": entries,
    }


def _practitioner(
    prefix: str, name: str, title: str, phone: str, ref: Any, org: str
) -> list[dict[str, Any]]:
    person: dict[str, Any] = {
        "resourceType": "Practitioner",
        "id": prefix,
        "name": [{"text": name}],
    }
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": f"{prefix}-role",
        "practitioner": ref("Practitioner", prefix),
        "organization": ref("Organization", _org_id(org)),
    }
    if title:
        role["code"] = [{"text": title}]
    if phone:
        role["telecom"] = [{"system": "phone", "value": phone, "use": "work"}]
    return [person, role]


def is_return(bundle: dict[str, Any]) -> bool:
    """A party's return message (a Communication about a notice), not the hospital's."""
    return any(
        e["resource"].get("resourceType") == "Communication"
        and _identifier(e["resource"].get("about"), NOTICE_SYSTEM)
        for e in bundle.get("entry", [])
    )


def to_ward(bundle: dict[str, Any]) -> bool:
    """Whether this message goes back to the ward (the unit that sent the stay's notices)."""
    if not is_return(bundle):
        return False
    return read_bundle(bundle).event in rules().to_ward


def answered_message(bundle: dict[str, Any]) -> str:
    """The id of the stay's message a return answers ('' for the hospital's own)."""
    comm = next(
        (
            e["resource"]
            for e in bundle.get("entry", [])
            if e["resource"].get("resourceType") == "Communication"
        ),
        None,
    )
    return _identifier(comm.get("about"), MESSAGE_SYSTEM) if comm else ""


def named_recipients(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    """(HSA-id, role) a return names besides the rules: the ward for a request for
    information, the party that asked for an answer."""
    comm = next(
        (
            e["resource"]
            for e in bundle.get("entry", [])
            if e["resource"].get("resourceType") == "Communication"
        ),
        None,
    )
    if not comm or not is_return(bundle):
        return []
    role = "ward" if read_bundle(bundle).event is LusEvent.INFORMATIONSBEGARAN else "asker"
    return [
        (str(r["identifier"]["value"]), role)
        for r in comm.get("recipient") or []
        if isinstance(r.get("identifier"), dict) and r["identifier"].get("system") == HSA_SYSTEM
    ]


def ward_lines(bundle: dict[str, Any]) -> list[tuple[str, str, str]]:
    """What the ward is told, as (code, label, value) observations in Swedish (no codes the
    ward's system must know beyond these)."""
    index = resources_by_ref(bundle)
    comm = _communication(bundle)
    event = read_bundle(bundle).event
    lines = [("MEDDELANDE", "Meddelande", event.display)]
    person, _ = _person(index, comm.get("sender"))
    if person:
        lines.append(
            (
                "UTFORDAV",
                "Utförd av",
                f"{person.name} ({person.role})" if person.role else person.name,
            )
        )
    for rc in comm.get("reasonCode", []):
        c = rc["coding"][0]
        label = "Behov/insats" if c["system"] == NEED_SYSTEM else "Avvikelsekategori"
        lines.append(
            (
                "BEHOV" if c["system"] == NEED_SYSTEM else "KATEGORI",
                label,
                c.get("display", c["code"]),
            )
        )
    for p in comm.get("payload", []):
        if "contentString" in p:
            lines.append(("TEXT", "Text", p["contentString"]))
            continue
        target = resolve(index, p.get("contentReference")) or {}
        if target.get("resourceType") == "PractitionerRole":
            _, contact = _person(index, p["contentReference"])
            assert contact is not None
            lines += [
                ("FVKNAMN", "Fast vårdkontakt", contact.name),
                ("FVKTITEL", "Yrkestitel", contact.title),
                ("FVKTELEFON", "Direkttelefon", contact.phone),
            ]
        elif target.get("resourceType") == "Appointment":
            start = datetime.fromisoformat(_sip_start(target)).astimezone(clock.STOCKHOLM)
            lines.append(("SIPTID", "SIP-möte", start.strftime("%Y-%m-%d %H:%M")))
    return lines
