"""Build and read the canonical FHIR R4 message Bundle.

Every source adapter fills a :class:`CanonicalMessage` and calls :func:`to_bundle`; every
later stage reads the stored Bundle back through :func:`read_bundle`. Nothing else in the
gateway knows how the Bundle is laid out.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from gateway.model.events import LUS_EVENT_SYSTEM, LusEvent
from gateway.model.identifiers import (
    HSA_SYSTEM,
    SYSTEMS,
    IdentifierKind,
    PatientId,
    local_unit_system,
)

BRYGGA_SOURCE_ENDPOINT = "urn:brygga:gateway"
CONSENT_BASIS_SYSTEM = "https://brygga.dev/fhir/CodeSystem/consent-basis"
CARE_ROLE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/care-role"
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
DISCHARGE_DISPOSITION_SYSTEM = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
DIAGNOSIS_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
CONDITION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-category"
DOCUMENT_TYPE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/document-type"
DOCUMENT_FLAG_SYSTEM = "https://brygga.dev/fhir/CodeSystem/document-flag"
REFERRAL_TYPE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/referral-type"
READY_FOR_DISCHARGE_URL = "https://brygga.dev/fhir/StructureDefinition/ready-for-discharge"
NURSING_REFERRAL = "nursing-referral"


@dataclass(frozen=True, slots=True)
class CareParty:
    """An organisation that serves the patient (home care, SÄBO, rehab, listed clinic …)."""

    role: str
    hsa_id: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class ConsentBasis:
    """The legal basis the sender recorded: 'samtycke', 'menprovning' or 'sparr'."""

    basis: str
    decided_at: datetime | None = None
    physician_hsa_id: str = ""


@dataclass(frozen=True, slots=True)
class Coding:
    """A code in a FHIR system (ICD-10-SE diagnosis, ATC substance …)."""

    system: str
    code: str
    display: str = ""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """A diagnosis of the stay: a Condition, listed in Encounter.diagnosis."""

    code: Coding
    use: str = ""  # diagnosis-role code: AD (admission), DD (discharge); "" none
    rank: int | None = None
    recorded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class MedicationEntry:
    """One line of the medication list: an ATC-coded MedicationStatement."""

    medication: Coding
    instructions: str = ""
    dose: str = ""  # a decimal as text (exact), "" when not given
    dose_high: str = ""  # upper end of a dose range
    dose_unit: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    """Document content: embedded (base64 ``data``) or referenced (``url``)."""

    content_type: str  # MIME type; "" when unknown (a document referenced by number only)
    data: str = ""
    url: str = ""
    title: str = ""


@dataclass(frozen=True, slots=True)
class Document:
    """A clinical document (MDM): a DocumentReference with one or more attachments."""

    type_code: str
    title: str
    attachments: tuple[Attachment, ...]
    identifier: str = ""
    created_at: datetime | None = None
    status: str = "final"  # DocumentReference.docStatus
    author_hsa_id: str = ""
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Referral:
    """A referral to a care party (REF^I12): a ServiceRequest, performer ``to``."""

    to: CareParty
    type_code: str
    type_text: str = ""
    reason: str = ""
    priority: str = ""
    identifier: str = ""
    authored_at: datetime | None = None


@dataclass(slots=True)
class CanonicalMessage:
    """What a source said, in the gateway's terms. Adapters build it; to_bundle() renders it."""

    event: LusEvent
    occurred_at: datetime
    sender_hsa_id: str
    sender_name: str
    patient_ids: list[PatientId]
    family: str = field(default="", repr=False)
    given: str = field(default="", repr=False)
    birth_date: str = field(default="", repr=False)
    gender: str = "unknown"
    protected_identity: bool = False
    encounter_id: str = ""
    encounter_class: str = "IMP"
    admitted_at: datetime | None = None
    expected_discharge: datetime | None = None
    ward_hsa_id: str = ""
    ward_code: str = ""  # PV1-3 as sent when it is no HSA-id and not mapped (a local code)
    listed_clinic: CareParty | None = None
    care_parties: list[CareParty] = field(default_factory=list)
    consent: ConsentBasis | None = None
    note: str = field(default="", repr=False)
    encounter_status: str = "in-progress"
    discharged_at: datetime | None = None
    discharge_disposition: str = ""
    ready_at: datetime | None = None  # the physician's ready-for-discharge decision
    replaces_ids: list[PatientId] = field(default_factory=list)  # a merge: the prior identity
    diagnoses: list[Diagnosis] = field(default_factory=list, repr=False)
    medications: list[MedicationEntry] = field(default_factory=list, repr=False)
    documents: list[Document] = field(default_factory=list, repr=False)
    referral: Referral | None = field(default=None, repr=False)

    @property
    def primary_id(self) -> PatientId:
        """The identity that keys the patient (ordering, pseudonyms): national before local."""
        order = [IdentifierKind.PERSONNUMMER, IdentifierKind.SAMORDNINGSNUMMER]
        for kind in order:
            for pid in self.patient_ids:
                if pid.kind is kind:
                    return pid
        return self.patient_ids[0]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _org(hsa_id: str, name: str) -> dict[str, Any]:
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": _org_id(hsa_id),
        "identifier": [{"system": HSA_SYSTEM, "value": hsa_id}],
    }
    if name:
        org["name"] = name
    return org


@functools.lru_cache(maxsize=4096)
def _org_id(hsa_id: str) -> str:
    # cached: called several times per resource, for a few hundred distinct units
    return "org-" + "".join(c if c.isascii() and c.isalnum() else "-" for c in hsa_id).lower()


def to_bundle(msg: CanonicalMessage, message_id: str | None = None) -> dict[str, Any]:
    """Render the canonical message as a FHIR R4 ``Bundle`` of type ``message`` (JSON dict)."""
    message_id = message_id or str(uuid.uuid4())
    orgs: dict[str, dict[str, Any]] = {msg.sender_hsa_id: _org(msg.sender_hsa_id, msg.sender_name)}
    parties = ([msg.listed_clinic] if msg.listed_clinic else []) + msg.care_parties
    if msg.referral:
        parties.append(msg.referral.to)
    for party in parties:
        orgs.setdefault(party.hsa_id, _org(party.hsa_id, party.name))

    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "patient",
        "identifier": [{"system": p.system, "value": p.value} for p in msg.patient_ids],
        "gender": msg.gender,
    }
    if msg.family or msg.given:
        patient["name"] = [{"family": msg.family, "given": [msg.given] if msg.given else []}]
    if msg.birth_date:
        patient["birthDate"] = msg.birth_date
    if msg.listed_clinic:
        patient["generalPractitioner"] = [
            {"reference": f"Organization/{_org_id(msg.listed_clinic.hsa_id)}"}
        ]
    if msg.protected_identity:
        patient["meta"] = {"security": [{"system": SECURITY_SYSTEM, "code": "R"}]}

    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": "encounter",
        "status": msg.encounter_status,
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": msg.encounter_class,
        },
        "subject": {"reference": "Patient/patient"},
        "serviceProvider": {"reference": f"Organization/{_org_id(msg.sender_hsa_id)}"},
    }
    if msg.encounter_id:
        encounter["identifier"] = [{"value": msg.encounter_id}]
    if msg.admitted_at:
        encounter["period"] = {"start": _iso(msg.admitted_at)}
    if msg.discharged_at:
        encounter.setdefault("period", {})["end"] = _iso(msg.discharged_at)
    if msg.discharge_disposition:
        encounter["hospitalization"] = {
            "dischargeDisposition": {
                "coding": [
                    {"system": DISCHARGE_DISPOSITION_SYSTEM, "code": msg.discharge_disposition}
                ]
            }
        }
    if msg.ready_at:
        encounter["extension"] = [
            {"url": READY_FOR_DISCHARGE_URL, "valueDateTime": _iso(msg.ready_at)}
        ]
    if msg.ward_hsa_id:
        encounter["location"] = [
            {"location": {"identifier": {"system": HSA_SYSTEM, "value": msg.ward_hsa_id}}}
        ]
    elif msg.ward_code:
        system = local_unit_system(msg.sender_hsa_id)
        encounter["location"] = [
            {"location": {"identifier": {"system": system, "value": msg.ward_code}}}
        ]

    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": message_id,
        "eventCoding": {
            "system": LUS_EVENT_SYSTEM,
            "code": msg.event.value,
            "display": msg.event.display,
        },
        "source": {"endpoint": BRYGGA_SOURCE_ENDPOINT},
        "sender": {"reference": f"Organization/{_org_id(msg.sender_hsa_id)}"},
        "focus": [{"reference": "Encounter/encounter"}],
    }

    resources: list[dict[str, Any]] = [header, patient, encounter, *orgs.values()]
    if msg.care_parties:
        resources.append(
            {
                "resourceType": "CareTeam",
                "id": "careteam",
                "status": "active",
                "subject": {"reference": "Patient/patient"},
                "participant": [
                    {
                        "role": [{"coding": [{"system": CARE_ROLE_SYSTEM, "code": p.role}]}],
                        "member": {"reference": f"Organization/{_org_id(p.hsa_id)}"},
                    }
                    for p in msg.care_parties
                ],
            }
        )
    if msg.event.has_careplan:
        careplan: dict[str, Any] = {
            "resourceType": "CarePlan",
            "id": "careplan",
            "status": "active",
            "intent": "plan",
            "subject": {"reference": "Patient/patient"},
            "encounter": {"reference": "Encounter/encounter"},
        }
        if msg.expected_discharge:
            careplan["period"] = {"end": _iso(msg.expected_discharge)}
        if msg.note:
            careplan["note"] = [{"text": msg.note}]
        resources.append(careplan)
        header["focus"].append({"reference": "CarePlan/careplan"})
    if msg.consent:
        resources.append(_consent(msg.consent))
    _clinical(msg, resources, header, encounter, patient)

    return {
        "resourceType": "Bundle",
        "id": message_id,
        "type": "message",
        "timestamp": _iso(msg.occurred_at),
        "entry": [{"fullUrl": _full_url(message_id, r), "resource": r} for r in resources],
    }


def _ref(resource: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def _coding(coding: Coding) -> dict[str, str]:
    out = {"system": coding.system, "code": coding.code}
    if coding.display:
        out["display"] = coding.display
    return out


def _number(text: str) -> int | float:
    """A decimal from its text: an int when whole (FHIR JSON decimals are numbers)."""
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _clinical(
    msg: CanonicalMessage,
    resources: list[dict[str, Any]],
    header: dict[str, Any],
    encounter: dict[str, Any],
    patient: dict[str, Any],
) -> None:
    """Diagnoses, medication list, documents, referral and a merge's prior identity."""
    subject = {"reference": "Patient/patient"}
    enc_ref = {"reference": "Encounter/encounter"}
    if msg.replaces_ids:
        prior = {
            "resourceType": "Patient",
            "id": "patient-prior",
            "identifier": [{"system": p.system, "value": p.value} for p in msg.replaces_ids],
            "active": False,
            "link": [{"other": subject, "type": "replaced-by"}],
        }
        patient["link"] = [{"other": _ref(prior), "type": "replaces"}]
        resources.append(prior)
        header["focus"].append(subject)
    diagnosis_list = []
    for n, diag in enumerate(msg.diagnoses, 1):
        condition: dict[str, Any] = {
            "resourceType": "Condition",
            "id": f"condition-{n}",
            "category": [
                {"coding": [{"system": CONDITION_CATEGORY_SYSTEM, "code": "encounter-diagnosis"}]}
            ],
            "code": {"coding": [_coding(diag.code)]},
            "subject": subject,
            "encounter": enc_ref,
        }
        if diag.recorded_at:
            condition["recordedDate"] = _iso(diag.recorded_at)
        resources.append(condition)
        entry: dict[str, Any] = {"condition": _ref(condition)}
        if diag.use:
            entry["use"] = {"coding": [{"system": DIAGNOSIS_ROLE_SYSTEM, "code": diag.use}]}
        if diag.rank is not None:
            entry["rank"] = diag.rank
        diagnosis_list.append(entry)
    if diagnosis_list:
        encounter["diagnosis"] = diagnosis_list
    for n, med in enumerate(msg.medications, 1):
        statement: dict[str, Any] = {
            "resourceType": "MedicationStatement",
            "id": f"medication-{n}",
            "status": "active",
            "medicationCodeableConcept": {"coding": [_coding(med.medication)]},
            "subject": subject,
            "context": enc_ref,
        }
        dosage: dict[str, Any] = {}
        if med.instructions:
            dosage["text"] = med.instructions
        if med.dose:
            low: dict[str, Any] = {"value": _number(med.dose)}
            if med.dose_unit:
                low["unit"] = med.dose_unit
            if med.dose_high:
                high: dict[str, Any] = {"value": _number(med.dose_high)}
                if med.dose_unit:
                    high["unit"] = med.dose_unit
                dosage["doseAndRate"] = [{"doseRange": {"low": low, "high": high}}]
            else:
                dosage["doseAndRate"] = [{"doseQuantity": low}]
        if dosage:
            statement["dosage"] = [dosage]
        resources.append(statement)
    for n, doc in enumerate(msg.documents, 1):
        resources.append(_document(n, doc))
        header["focus"].append({"reference": f"DocumentReference/document-{n}"})
    if msg.referral:
        request = _referral(msg.referral, msg.sender_hsa_id)
        resources.append(request)
        header["focus"].append(_ref(request))
        for res in resources:
            if res["resourceType"] == "CarePlan":
                res["activity"] = [{"reference": _ref(request)}]


def _document(n: int, doc: Document) -> dict[str, Any]:
    attachments = []
    for att in doc.attachments:
        attachment: dict[str, Any] = {"contentType": att.content_type} if att.content_type else {}
        if att.data:
            attachment["data"] = att.data
        if att.url:
            attachment["url"] = att.url
        attachment["title"] = att.title or doc.title
        if doc.created_at:
            attachment["creation"] = _iso(doc.created_at)
        attachments.append({"attachment": attachment})
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": f"document-{n}",
        "status": "current",
        "docStatus": doc.status,
        "type": {
            "coding": [
                {"system": DOCUMENT_TYPE_SYSTEM, "code": doc.type_code, "display": doc.title}
            ]
        },
        "subject": {"reference": "Patient/patient"},
        "description": doc.title,
        "content": attachments,
        "context": {"encounter": [{"reference": "Encounter/encounter"}]},
    }
    if doc.identifier:
        resource["masterIdentifier"] = {"value": doc.identifier}
    if doc.flags:
        resource["category"] = [
            {"coding": [{"system": DOCUMENT_FLAG_SYSTEM, "code": flag}]} for flag in doc.flags
        ]
    if doc.created_at:
        resource["date"] = _iso(doc.created_at)
    if doc.author_hsa_id:
        resource["author"] = [{"identifier": {"system": HSA_SYSTEM, "value": doc.author_hsa_id}}]
    return resource


def _referral(ref: Referral, sender_hsa_id: str) -> dict[str, Any]:
    code: dict[str, Any] = {"coding": [{"system": REFERRAL_TYPE_SYSTEM, "code": ref.type_code}]}
    if ref.type_text:
        code["text"] = ref.type_text
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "referral",
        "status": "active",
        "intent": "order",
        "code": code,
        "subject": {"reference": "Patient/patient"},
        "encounter": {"reference": "Encounter/encounter"},
        "requester": {"reference": f"Organization/{_org_id(sender_hsa_id)}"},
        "performer": [{"reference": f"Organization/{_org_id(ref.to.hsa_id)}"}],
    }
    if ref.identifier:
        resource["identifier"] = [{"value": ref.identifier}]
    if ref.priority:
        resource["priority"] = ref.priority
    if ref.authored_at:
        resource["authoredOn"] = _iso(ref.authored_at)
    if ref.reason:
        resource["reasonCode"] = [{"text": ref.reason}]
    return resource


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes


def _full_url(message_id: str, resource: dict[str, Any]) -> str:
    """A stable ``urn:uuid`` per resource of this message (the same Bundle renders the same).

    Exactly ``uuid.uuid5(NAMESPACE_URL, name)``, computed without building UUID objects:
    on the accept path that halves the cost of ``to_bundle``.
    """
    name = f"{message_id}/{resource['resourceType']}/{resource['id']}"
    raw = bytearray(hashlib.sha1(_URL_NAMESPACE + name.encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def bundle_json(bundle: dict[str, Any]) -> str:
    """The Bundle as compact UTF-8 JSON text, as the store keeps it."""
    return orjson.dumps(bundle).decode()


def _consent(consent: ConsentBasis) -> dict[str, Any]:
    provision = "deny" if consent.basis == "sparr" else "permit"
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": consent.basis}]}],
        "patient": {"reference": "Patient/patient"},
        "provision": {"type": provision},
    }
    if consent.decided_at:
        resource["dateTime"] = _iso(consent.decided_at)
    if consent.physician_hsa_id:
        resource["performer"] = [
            {"identifier": {"system": HSA_SYSTEM, "value": consent.physician_hsa_id}}
        ]
    return resource


@dataclass(frozen=True, slots=True)
class BundleView:
    """What routing, consent and the inbox need to know about a stored Bundle."""

    message_id: str
    event: LusEvent
    sender_hsa_id: str
    parties: list[CareParty]
    consent_basis: str | None
    protected_identity: bool
    patient_name: str
    patient_identifier: str
    encounter_id: str = ""
    ready_at: datetime | None = None
    nursing_referral: bool = False
    occurred_at: datetime | None = None  # Bundle.timestamp: when the event happened
    # What the message carries that routing treats apart (mappings/routing, [content.*]):
    # "medication" (a medication list), and the documents' flags ("nursing-referral", …).
    contents: frozenset[str] = frozenset()
    prior_identifiers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def resources_by_ref(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A Bundle's resources by their ``Type/id`` reference."""
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
        for e in bundle.get("entry", [])
    }


def _hsa_of(org: dict[str, Any] | None) -> str:
    for ident in (org or {}).get("identifier", []):
        if ident.get("system") == HSA_SYSTEM:
            return str(ident["value"])
    return ""


def read_bundle(bundle: dict[str, Any]) -> BundleView:
    """Read the facts the pipeline acts on back out of a canonical Bundle."""
    res = resources_by_ref(bundle)
    header = bundle["entry"][0]["resource"]
    patient = res.get("Patient/patient", {})
    parties: list[CareParty] = []
    for ref in patient.get("generalPractitioner", []):
        org = res.get(ref["reference"])
        parties.append(CareParty("listed-clinic", _hsa_of(org), (org or {}).get("name", "")))
    for participant in res.get("CareTeam/careteam", {}).get("participant", []):
        org = res.get(participant["member"]["reference"])
        role = participant["role"][0]["coding"][0]["code"]
        parties.append(CareParty(role, _hsa_of(org), (org or {}).get("name", "")))
    consent = res.get("Consent/consent")
    basis = consent["category"][0]["coding"][0]["code"] if consent else None
    names = patient.get("name") or [{}]
    name = " ".join([*names[0].get("given", []), names[0].get("family", "")]).strip()
    idents = patient.get("identifier") or [{}]
    security = patient.get("meta", {}).get("security", [])
    encounter = res.get("Encounter/encounter", {})
    ready = next(
        (
            e["valueDateTime"]
            for e in encounter.get("extension", [])
            if e.get("url") == READY_FOR_DISCHARGE_URL
        ),
        None,
    )
    flags = {
        coding.get("code")
        for key, resource in res.items()
        if key.startswith("DocumentReference/")
        for category in resource.get("category", [])
        for coding in category.get("coding", [])
        if coding.get("system") == DOCUMENT_FLAG_SYSTEM
    }
    prior = res.get("Patient/patient-prior", {})
    return BundleView(
        message_id=bundle["id"],
        event=LusEvent(header["eventCoding"]["code"]),
        sender_hsa_id=_hsa_of(res.get(header["sender"]["reference"])),
        parties=parties,
        consent_basis=basis,
        protected_identity=any(s.get("code") == "R" for s in security),
        patient_name=name,
        patient_identifier=str(idents[0].get("value", "")),
        encounter_id=str((encounter.get("identifier") or [{}])[0].get("value", "")),
        ready_at=datetime.fromisoformat(ready) if ready else None,
        nursing_referral=NURSING_REFERRAL in flags,
        occurred_at=datetime.fromisoformat(bundle["timestamp"]) if "timestamp" in bundle else None,
        contents=frozenset(flags) | contents_of_resources(res),
        prior_identifiers=tuple(
            (str(i.get("system", "")), str(i.get("value", ""))) for i in prior.get("identifier", [])
        ),
    )


MEDICATION = "medication"


def withheld_kinds(stored: str | None) -> list[str]:
    """``deliveries.withheld`` (comma-separated) as a list."""
    return [k for k in (stored or "").split(",") if k]


def contents_of_resources(res: dict[str, dict[str, Any]]) -> frozenset[str]:
    return frozenset({MEDICATION} if any(k.startswith("MedicationStatement/") for k in res) else ())


def _carries(resource: dict[str, Any], kinds: frozenset[str]) -> bool:
    if resource["resourceType"] == "MedicationStatement":
        return MEDICATION in kinds
    if resource["resourceType"] == "DocumentReference":
        return any(
            coding.get("system") == DOCUMENT_FLAG_SYSTEM and coding.get("code") in kinds
            for category in resource.get("category", [])
            for coding in category.get("coding", [])
        )
    return False


def withhold(bundle: dict[str, Any], kinds: Iterable[str]) -> dict[str, Any]:
    """The Bundle without the content of ``kinds`` (a medication list, flagged documents), and
    without references to what was taken out. For recipients the content is not for (the needs
    assessor is not health staff; mappings/routing, ``withheld_from``)."""
    drop = frozenset(kinds)
    if not drop:
        return bundle
    gone = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if _carries(e["resource"], drop)
    }
    if not gone:
        return bundle

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [
                scrub(v) for v in node if not (isinstance(v, dict) and v.get("reference") in gone)
            ]
        return node

    kept = [
        e
        for e in bundle.get("entry", [])
        if f"{e['resource']['resourceType']}/{e['resource']['id']}" not in gone
    ]
    return scrub({**bundle, "entry": kept})  # type: ignore[no-any-return]


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate against the FHIR R4 (R4B models) Bundle schema; raises ValueError."""
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


__all__ = [
    "SYSTEMS",
    "Attachment",
    "BundleView",
    "CanonicalMessage",
    "CareParty",
    "Coding",
    "ConsentBasis",
    "Diagnosis",
    "Document",
    "MedicationEntry",
    "Referral",
    "read_bundle",
    "to_bundle",
    "validate_bundle",
]
