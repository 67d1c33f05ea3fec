"""Build and read the canonical FHIR R4 message Bundle.

Every source adapter fills a :class:`CanonicalMessage` and calls :func:`to_bundle`; every
later stage reads the stored Bundle back through :func:`read_bundle`. Nothing else in the
gateway knows how the Bundle is laid out.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.model.events import LUS_EVENT_SYSTEM, LusEvent
from gateway.model.identifiers import HSA_SYSTEM, SYSTEMS, IdentifierKind, PatientId

BRYGGA_SOURCE_ENDPOINT = "urn:brygga:gateway"
CONSENT_BASIS_SYSTEM = "https://brygga.dev/fhir/CodeSystem/consent-basis"
CARE_ROLE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/care-role"
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


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
    listed_clinic: CareParty | None = None
    care_parties: list[CareParty] = field(default_factory=list)
    consent: ConsentBasis | None = None
    note: str = field(default="", repr=False)

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


def _org_id(hsa_id: str) -> str:
    return "org-" + "".join(c if c.isascii() and c.isalnum() else "-" for c in hsa_id).lower()


def to_bundle(msg: CanonicalMessage, message_id: str | None = None) -> dict[str, Any]:
    """Render the canonical message as a FHIR R4 ``Bundle`` of type ``message`` (JSON dict)."""
    message_id = message_id or str(uuid.uuid4())
    orgs: dict[str, dict[str, Any]] = {msg.sender_hsa_id: _org(msg.sender_hsa_id, msg.sender_name)}
    parties = ([msg.listed_clinic] if msg.listed_clinic else []) + msg.care_parties
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
        "status": "in-progress",
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
    if msg.ward_hsa_id:
        encounter["location"] = [
            {"location": {"identifier": {"system": HSA_SYSTEM, "value": msg.ward_hsa_id}}}
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

    return {
        "resourceType": "Bundle",
        "id": message_id,
        "type": "message",
        "timestamp": _iso(msg.occurred_at),
        "entry": [{"fullUrl": _full_url(message_id, r), "resource": r} for r in resources],
    }


def _full_url(message_id: str, resource: dict[str, Any]) -> str:
    """A stable ``urn:uuid`` per resource of this message (the same Bundle renders the same)."""
    name = f"{message_id}/{resource['resourceType']}/{resource['id']}"
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"


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


def _resources(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
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
    res = _resources(bundle)
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
    return BundleView(
        message_id=bundle["id"],
        event=LusEvent(header["eventCoding"]["code"]),
        sender_hsa_id=_hsa_of(res.get(header["sender"]["reference"])),
        parties=parties,
        consent_basis=basis,
        protected_identity=any(s.get("code") == "R" for s in security),
        patient_name=name,
        patient_identifier=str(idents[0].get("value", "")),
    )


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate against the FHIR R4 (R4B models) Bundle schema; raises ValueError."""
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


__all__ = [
    "SYSTEMS",
    "BundleView",
    "CanonicalMessage",
    "CareParty",
    "ConsentBasis",
    "read_bundle",
    "to_bundle",
    "validate_bundle",
]
