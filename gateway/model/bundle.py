"""Build and read the canonical FHIR R4 message Bundle.

Every source adapter fills a :class:`CanonicalMessage` and calls :func:`to_bundle`; every
later stage reads the stored Bundle back through :func:`read_bundle`. Nothing else in the
gateway knows how the Bundle is laid out.
"""

from __future__ import annotations

import functools
import hashlib
import html
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from gateway.model.events import LUS_EVENT_SYSTEM, LusEvent
from gateway.model.identifiers import (
    HSA_SYSTEM,
    LOCAL_UNIT_SYSTEM,
    SYSTEMS,
    IdentifierKind,
    PatientId,
    is_hsa_id,
    local_identifier_system,
    local_unit_system,
)

# MessageHeader.source.endpoint: where answers reach the gateway (its FHIR base; a response
# message goes to ``{endpoint}/$process-message``). The default is the default Settings'
# HTTP address; the running gateway passes Settings.fhir_endpoint.
DEFAULT_SOURCE_ENDPOINT = "http://127.0.0.1:8080/fhir"
BRYGGA_SOURCE_ENDPOINT = DEFAULT_SOURCE_ENDPOINT
CONSENT_BASIS_SYSTEM = "https://brygga.dev/fhir/CodeSystem/consent-basis"
CARE_ROLE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/care-role"
# hl7se.fhir.base SecurityLabelCS: Patient.meta.security of a protected identity.
SE_SECURITY_SYSTEM = "http://hl7.se/fhir/ig/base/CodeSystem/SecurityLabel"
SEKRETESSMARKERING = "sekretessmarkering"
SKYDDAD_FOLKBOKFORING = "skyddadFolkbokforing"
# Bundles stored before hl7se labels carry v3-Confidentiality "R"; still read as protected.
SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
_PROTECTED = {
    (SE_SECURITY_SYSTEM, SEKRETESSMARKERING),
    (SE_SECURITY_SYSTEM, SKYDDAD_FOLKBOKFORING),
    (SECURITY_SYSTEM, "R"),
}
V2_0203_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
# The legal basis of a Consent (ppc-1: policy or policyRule), as the Swedish statutes at
# riksdagen.se (docs/decisions/0015-fhir-references-and-hl7se.md).
SFS_LUS = (
    "https://www.riksdagen.se/sv/dokument-och-lagar/dokument/svensk-forfattningssamling/"
    "lag-2017612-om-samverkan-vid-utskrivning-fran_sfs-2017-612/"
)
SFS_PDL = (
    "https://www.riksdagen.se/sv/dokument-och-lagar/dokument/svensk-forfattningssamling/"
    "patientdatalag-2008355_sfs-2008-355/"
)
SFS_OSL = (
    "https://www.riksdagen.se/sv/dokument-och-lagar/dokument/svensk-forfattningssamling/"
    "offentlighets-och-sekretesslag-2009400_sfs-2009-400/"
)
CONSENT_POLICIES: dict[str, tuple[str, ...]] = {
    "samtycke": (SFS_LUS, SFS_PDL),  # the patient's consent (PDL 6 kap., LUS 3 kap.)
    "menprovning": (SFS_LUS, SFS_OSL),  # disclosure after menprövning, OSL 25 kap. 1 §
    "sparr": (SFS_LUS, SFS_PDL),  # the patient's block (spärr), PDL 4 kap. 4 § / 6 kap. 2 §
}
DISCHARGE_DISPOSITION_SYSTEM = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
DIAGNOSIS_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
CONDITION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-category"
DOCUMENT_TYPE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/document-type"
DOCUMENT_FLAG_SYSTEM = "https://brygga.dev/fhir/CodeSystem/document-flag"
REFERRAL_TYPE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/referral-type"
READY_FOR_DISCHARGE_URL = "https://brygga.dev/fhir/StructureDefinition/ready-for-discharge"
NURSING_REFERRAL = "nursing-referral"
# The sender's judgement of the support the patient needs after discharge (LUS, 001:2599-2610;
# docs/decisions/0017-lus-cases-and-needs.md): one Encounter extension per code.
LUS_NEEDS_URL = "https://brygga.dev/fhir/StructureDefinition/lus-needs"
LUS_NEED_SYSTEM = "https://brygga.dev/fhir/CodeSystem/lus-need"
SOCIALTJANST = "socialtjanst"  # support from the municipality's social services
OPPENVARD = "oppenvard"  # support from primary care (öppenvården)
INGA_BEHOV = "inga-behov"  # judged not to need support: not a LUS case
EJ_BEDOMD = "ej-bedomd"  # a feed of every admission, this message judges nothing
LUS_NEEDS = (SOCIALTJANST, OPPENVARD)
LUS_NEED_CODES = frozenset({*LUS_NEEDS, INGA_BEHOV, EJ_BEDOMD})
# Patient.address: the folkbokföringsadress (PID-11), typed by hl7se's official address type
# (SEBaseAddressPersonExtension, SNOMED CT 63381000052101 folkbokföringsadress), and the
# municipality code (kommunkod, SCB) as sent, in an extension of the Address (hl7se has no
# element for it; decision 0016).
SE_ADDRESS_TYPE_URL = "http://hl7.se/fhir/ig/base/StructureDefinition/SEBaseAddressPersonExtension"
SNOMED_SYSTEM = "http://snomed.info/sct"
FOLKBOKFORINGSADRESS = "63381000052101"
MUNICIPALITY_CODE_URL = "https://brygga.dev/fhir/StructureDefinition/municipality-code"
MUNICIPALITY_CODE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/kommunkod"
ADDRESS = "address"  # routing content kind: the Patient's address (mappings/routing)


@dataclass(frozen=True, slots=True)
class CareParty:
    """An organisation that serves the patient (home care, SÄBO, rehab, listed clinic …)."""

    role: str
    hsa_id: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Address:
    """The patient's folkbokföringsadress (PID-11): where the municipality finds the patient,
    and which municipality (and Stockholm district) must be told."""

    line: tuple[str, ...] = ()
    city: str = ""
    postal_code: str = ""  # five digits when well-formed, kept as sent otherwise
    municipality: str = ""  # kommunkod (4 digits) when the sender gave it (XAD-9)
    country: str = ""


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
    # What the message says of the patient's needs after discharge (LUS_NEED_CODES); None:
    # it says nothing (a feed of LUS cases only; the stay's earlier judgement stands).
    lus_needs: tuple[str, ...] | None = None
    address: Address | None = field(default=None, repr=False)

    @property
    def primary_id(self) -> PatientId:
        """The identity that keys the patient (ordering, pseudonyms): national before local."""
        order = [IdentifierKind.PERSONNUMMER, IdentifierKind.SAMORDNINGSNUMMER]
        for kind in order:
            for pid in self.patient_ids:
                if pid.kind is kind:
                    return pid
        return self.patient_ids[0]


def _address(address: Address) -> dict[str, Any]:
    """A FHIR Address of the folkbokföringsadress (hl7se official address type)."""
    out: dict[str, Any] = {
        "extension": [
            {
                "url": SE_ADDRESS_TYPE_URL,
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": SNOMED_SYSTEM,
                            "code": FOLKBOKFORINGSADRESS,
                            "display": "folkbokföringsadress",
                        }
                    ]
                },
            }
        ],
        "use": "home",
        "type": "physical",
    }
    if address.line:
        out["line"] = list(address.line)
    if address.city:
        out["city"] = address.city
    if address.municipality:
        out["extension"].append(
            {
                "url": MUNICIPALITY_CODE_URL,
                "valueCoding": {"system": MUNICIPALITY_CODE_SYSTEM, "code": address.municipality},
            }
        )
    if address.postal_code:
        out["postalCode"] = address.postal_code
    if address.country:
        out["country"] = address.country
    return out


def _read_address(patient: dict[str, Any]) -> Address | None:
    """The folkbokföringsadress of a stored Patient (the first address), if it has one."""
    found = patient.get("address") or []
    if not found:
        return None
    a = found[0]
    code = next(
        (
            str(e.get("valueCoding", {}).get("code", ""))
            for e in a.get("extension", [])
            if e.get("url") == MUNICIPALITY_CODE_URL
        ),
        "",
    )
    return Address(
        tuple(a.get("line", [])),
        str(a.get("city", "")),
        str(a.get("postalCode", "")),
        code,
        str(a.get("country", "")),
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


Ref = Callable[[dict[str, Any]], dict[str, str]]


def _org(code: str, name: str, issuer: str = "") -> dict[str, Any]:
    """An Organization: the HSA system (typed PRN, as SEBaseOrganization's hsaid slice) only
    for an HSA-id; any other code (an unmapped MSH-4) under a local system of its issuer."""
    ident: dict[str, Any]
    if is_hsa_id(code):
        ident = {
            "type": {"coding": [{"system": V2_0203_SYSTEM, "code": "PRN"}]},
            "system": HSA_SYSTEM,
            "value": code,
        }
    else:
        ident = {"system": local_unit_system(issuer), "value": code}
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": _org_id(code),
        "identifier": [ident],
    }
    if name:
        org["name"] = name
    return org


@functools.lru_cache(maxsize=4096)
def _org_id(hsa_id: str) -> str:
    # cached: called several times per resource, for a few hundred distinct units
    return "org-" + "".join(c if c.isascii() and c.isalnum() else "-" for c in hsa_id).lower()


def _narrative(*lines: str) -> dict[str, str]:
    """A generated narrative (Swedish) for a human reader: one paragraph per line, escaped."""
    body = "".join(f"<p>{html.escape(line, quote=False)}</p>" for line in lines if line)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def to_bundle(
    msg: CanonicalMessage,
    message_id: str | None = None,
    source_endpoint: str = DEFAULT_SOURCE_ENDPOINT,
) -> dict[str, Any]:
    """Render the canonical message as a FHIR R4 ``Bundle`` of type ``message`` (JSON dict).

    Every reference is the target's ``urn:uuid`` fullUrl (R4 §2.36.4.1), and every entry is
    reachable from MessageHeader (focus, sender) through references.
    """
    message_id = message_id or str(uuid.uuid4())

    def ref(resource: dict[str, Any]) -> dict[str, str]:
        return {"reference": _full_url(message_id, resource)}

    def org_ref(code: str) -> dict[str, str]:
        return ref({"resourceType": "Organization", "id": _org_id(code)})

    sender = msg.sender_hsa_id
    orgs: dict[str, dict[str, Any]] = {sender: _org(sender, msg.sender_name)}
    parties = ([msg.listed_clinic] if msg.listed_clinic else []) + msg.care_parties
    if msg.referral:
        parties.append(msg.referral.to)
    for party in parties:
        orgs.setdefault(party.hsa_id, _org(party.hsa_id, party.name, sender))

    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "patient",
        "identifier": [{"system": p.fhir_system, "value": p.value} for p in msg.patient_ids],
        "gender": msg.gender,
    }
    if msg.family or msg.given:
        patient["name"] = [{"family": msg.family, "given": [msg.given] if msg.given else []}]
    if msg.birth_date:
        patient["birthDate"] = msg.birth_date
    if msg.address:
        patient["address"] = [_address(msg.address)]
    if msg.listed_clinic:
        patient["generalPractitioner"] = [org_ref(msg.listed_clinic.hsa_id)]
    if msg.protected_identity:
        patient["meta"] = {
            "security": [
                {
                    "system": SE_SECURITY_SYSTEM,
                    "code": SEKRETESSMARKERING,
                    "display": "Sekretessmarkering",
                }
            ]
        }
    subject = ref(patient)

    encounter: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": "encounter",
        "status": msg.encounter_status,
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": msg.encounter_class,
        },
        "subject": subject,
        "serviceProvider": org_ref(sender),
    }
    if msg.encounter_id:
        encounter["identifier"] = [
            {"system": local_identifier_system("encounter", sender), "value": msg.encounter_id}
        ]
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
    if msg.lus_needs is not None:
        encounter.setdefault("extension", []).extend(
            {"url": LUS_NEEDS_URL, "valueCoding": {"system": LUS_NEED_SYSTEM, "code": code}}
            for code in msg.lus_needs
        )
    if msg.ward_hsa_id:
        encounter["location"] = [
            {"location": {"identifier": {"system": HSA_SYSTEM, "value": msg.ward_hsa_id}}}
        ]
    elif msg.ward_code:
        system = local_unit_system(msg.sender_hsa_id)
        encounter["location"] = [
            {"location": {"identifier": {"system": system, "value": msg.ward_code}}}
        ]
    enc_ref = ref(encounter)

    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": message_id,
        "eventCoding": {
            "system": LUS_EVENT_SYSTEM,
            "code": msg.event.value,
            "display": msg.event.display,
        },
        "source": {"endpoint": source_endpoint},
        "sender": org_ref(sender),
        "focus": [enc_ref],
    }

    resources: list[dict[str, Any]] = [header, patient, encounter, *orgs.values()]
    careteam: dict[str, Any] | None = None
    if msg.care_parties:
        careteam = {
            "resourceType": "CareTeam",
            "id": "careteam",
            "status": "active",
            "subject": subject,
            "participant": [
                {
                    "role": [{"coding": [{"system": CARE_ROLE_SYSTEM, "code": p.role}]}],
                    "member": org_ref(p.hsa_id),
                }
                for p in msg.care_parties
            ],
        }
        resources.append(careteam)
        header["focus"].append(ref(careteam))  # who serves the patient: the receiver needs it
    if msg.event.has_careplan:
        careplan: dict[str, Any] = {
            "resourceType": "CarePlan",
            "id": "careplan",
            "status": "active",
            "intent": "plan",
            "subject": subject,
            "encounter": enc_ref,
        }
        if careteam is not None:
            careplan["careTeam"] = [ref(careteam)]
        if msg.expected_discharge:
            careplan["period"] = {"end": _iso(msg.expected_discharge)}
        if msg.note:
            careplan["note"] = [{"text": msg.note}]
        careplan["text"] = _narrative(
            f"Planering inför utskrivning: {msg.event.display}",
            f"Beräknat utskrivningsdatum: {msg.expected_discharge.date().isoformat()}"
            if msg.expected_discharge
            else "",
            msg.note,
        )
        resources.append(careplan)
        header["focus"].append(ref(careplan))
    if msg.consent:
        consent = _consent(msg.consent, subject)
        resources.append(consent)
        header["focus"].append(ref(consent))
    _clinical(msg, resources, header, encounter, patient, ref, org_ref)

    return {
        "resourceType": "Bundle",
        "id": message_id,
        "type": "message",
        "timestamp": _iso(msg.occurred_at),
        "entry": [{"fullUrl": _full_url(message_id, r), "resource": r} for r in resources],
    }


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
    ref: Ref,
    org_ref: Callable[[str], dict[str, str]],
) -> None:
    """Diagnoses, medication list, documents, referral and a merge's prior identity."""
    subject = ref(patient)
    enc_ref = ref(encounter)
    if msg.replaces_ids:
        prior = {
            "resourceType": "Patient",
            "id": "patient-prior",
            "identifier": [{"system": p.fhir_system, "value": p.value} for p in msg.replaces_ids],
            "active": False,
            "link": [{"other": subject, "type": "replaced-by"}],
        }
        patient["link"] = [{"other": ref(prior), "type": "replaces"}]
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
        entry: dict[str, Any] = {"condition": ref(condition)}
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
        # nothing else references a medication line: the header's focus makes it reachable
        header["focus"].append(ref(statement))
    for n, doc in enumerate(msg.documents, 1):
        document = _document(n, doc, msg.sender_hsa_id, subject, enc_ref)
        resources.append(document)
        header["focus"].append(ref(document))
    if msg.referral:
        request = _referral(msg.referral, msg.sender_hsa_id, subject, enc_ref, org_ref)
        resources.append(request)
        header["focus"].append(ref(request))
        for res in resources:
            if res["resourceType"] == "CarePlan":
                res["activity"] = [{"reference": ref(request)}]


def _document(
    n: int, doc: Document, sender: str, subject: dict[str, str], enc_ref: dict[str, str]
) -> dict[str, Any]:
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
        "text": _narrative(
            f"Dokument: {doc.title}",
            f"Skapat: {doc.created_at.isoformat()}" if doc.created_at else "",
        ),
        "status": "current",
        "docStatus": doc.status,
        "type": {
            "coding": [
                {"system": DOCUMENT_TYPE_SYSTEM, "code": doc.type_code, "display": doc.title}
            ]
        },
        "subject": subject,
        "description": doc.title,
        "content": attachments,
        "context": {"encounter": [enc_ref]},
    }
    if doc.identifier:
        resource["masterIdentifier"] = {
            "system": local_identifier_system("document", sender),
            "value": doc.identifier,
        }
    if doc.flags:
        resource["category"] = [
            {"coding": [{"system": DOCUMENT_FLAG_SYSTEM, "code": flag}]} for flag in doc.flags
        ]
    if doc.created_at:
        resource["date"] = _iso(doc.created_at)
    if doc.author_hsa_id:
        resource["author"] = [{"identifier": {"system": HSA_SYSTEM, "value": doc.author_hsa_id}}]
    return resource


def _referral(
    ref: Referral,
    sender_hsa_id: str,
    subject: dict[str, str],
    enc_ref: dict[str, str],
    org_ref: Callable[[str], dict[str, str]],
) -> dict[str, Any]:
    code: dict[str, Any] = {"coding": [{"system": REFERRAL_TYPE_SYSTEM, "code": ref.type_code}]}
    if ref.type_text:
        code["text"] = ref.type_text
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "referral",
        "text": _narrative(
            f"Remiss: {ref.type_text or ref.type_code}",
            f"Till: {ref.to.name or ref.to.hsa_id}",
            ref.reason,
        ),
        "status": "active",
        "intent": "order",
        "code": code,
        "subject": subject,
        "encounter": enc_ref,
        "requester": org_ref(sender_hsa_id),
        "performer": [org_ref(ref.to.hsa_id)],
    }
    if ref.identifier:
        resource["identifier"] = [
            {"system": local_identifier_system("referral", sender_hsa_id), "value": ref.identifier}
        ]
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
    return _full_url_of(message_id, resource["resourceType"], resource["id"])


@functools.lru_cache(maxsize=1024)
def _full_url_of(message_id: str, rtype: str, rid: str) -> str:
    # cached: one Bundle asks for the same few references many times
    name = f"{message_id}/{rtype}/{rid}"
    raw = bytearray(hashlib.sha1(_URL_NAMESPACE + name.encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def bundle_json(bundle: dict[str, Any]) -> str:
    """The Bundle as compact UTF-8 JSON text, as the store keeps it."""
    return orjson.dumps(bundle).decode()


def consent_policy(basis: str) -> list[dict[str, str]]:
    """Consent.policy (ppc-1): the Swedish statutes the basis rests on, as riksdagen.se URIs."""
    return [{"uri": uri} for uri in CONSENT_POLICIES.get(basis, (SFS_LUS,))]


def _consent(consent: ConsentBasis, patient: dict[str, str]) -> dict[str, Any]:
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
        "patient": patient,
        "policy": consent_policy(consent.basis),
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
    # The LUS need codes the message carries (LUS_NEED_CODES); None: it carries none.
    lus_needs: frozenset[str] | None = None
    address: Address | None = field(default=None, repr=False)  # the folkbokföringsadress
    referral: bool = False  # a referral (ServiceRequest): addressed to its provider alone


def resources_by_ref(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A Bundle's resources under every name a reference inside it may use (R4 §2.36.4.1).

    Each entry is indexed by its fullUrl (``urn:uuid:…`` or an absolute URL) and by
    ``Type/id``, so both Brygga's ``urn:uuid`` references and the ``Type/id`` references of
    Bundles stored before (or sent by FHIR clients) resolve through the same dict; a
    relative reference resolves against an absolute fullUrl's base through ``Type/id``.
    """
    index: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        for name in entry_names(entry):
            index.setdefault(name, resource)
    return index


def entry_names(entry: dict[str, Any]) -> list[str]:
    """The names a reference may give an entry by: its fullUrl and its ``Type/id``."""
    resource = entry.get("resource") or {}
    names = [str(entry["fullUrl"])] if entry.get("fullUrl") else []
    if resource.get("resourceType") and resource.get("id"):
        names.append(f"{resource['resourceType']}/{resource['id']}")
    return names


def resolve(index: dict[str, dict[str, Any]], reference: Any) -> dict[str, Any] | None:
    """The resource a Reference (or its string) names in a :func:`resources_by_ref` index.

    An absolute URL not itself a fullUrl resolves by its trailing ``Type/id``."""
    ref = reference.get("reference") if isinstance(reference, dict) else reference
    if not isinstance(ref, str) or not ref:
        return None
    found = index.get(ref)
    if found is None and "://" in ref:
        parts = ref.split("/")
        found = index.get("/".join(parts[-2:]))
    return found


def _hsa_of(org: dict[str, Any] | None) -> str:
    """The unit's HSA-id; for a unit known only by a local code (an unmapped sending
    facility), that code: routing and escalation key on it as they did before."""
    local = ""
    for ident in (org or {}).get("identifier", []):
        system = str(ident.get("system", ""))
        if system == HSA_SYSTEM:
            return str(ident["value"])
        if not local and system.startswith(LOCAL_UNIT_SYSTEM):
            local = str(ident.get("value", ""))
    return local


def read_bundle(bundle: dict[str, Any]) -> BundleView:
    """Read the facts the pipeline acts on back out of a canonical Bundle."""
    res = resources_by_ref(bundle)
    header = bundle["entry"][0]["resource"]
    patient = res.get("Patient/patient", {})
    parties: list[CareParty] = []
    for ref in patient.get("generalPractitioner", []):
        org = resolve(res, ref)
        parties.append(CareParty("listed-clinic", _hsa_of(org), (org or {}).get("name", "")))
    for participant in res.get("CareTeam/careteam", {}).get("participant", []):
        org = resolve(res, participant["member"])
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
        if key.startswith("DocumentReference/")  # each entry once: by its Type/id
        for category in resource.get("category", [])
        for coding in category.get("coding", [])
        if coding.get("system") == DOCUMENT_FLAG_SYSTEM
    }
    prior = res.get("Patient/patient-prior", {})
    needs = [
        str(e.get("valueCoding", {}).get("code", ""))
        for e in encounter.get("extension", [])
        if e.get("url") == LUS_NEEDS_URL
    ]
    return BundleView(
        message_id=bundle["id"],
        event=LusEvent(header["eventCoding"]["code"]),
        sender_hsa_id=_hsa_of(resolve(res, header["sender"])),
        parties=parties,
        consent_basis=basis,
        protected_identity=any((s.get("system"), s.get("code")) in _PROTECTED for s in security),
        patient_name=name,
        patient_identifier=str(idents[0].get("value", "")),
        encounter_id=str((encounter.get("identifier") or [{}])[0].get("value", "")),
        ready_at=datetime.fromisoformat(ready) if ready else None,
        nursing_referral=NURSING_REFERRAL in flags,
        occurred_at=datetime.fromisoformat(bundle["timestamp"]) if "timestamp" in bundle else None,
        contents=frozenset(flags)
        | contents_of_resources(res)
        | ({ADDRESS} if patient.get("address") else set()),
        prior_identifiers=tuple(
            (str(i.get("system", "")), str(i.get("value", ""))) for i in prior.get("identifier", [])
        ),
        lus_needs=frozenset(needs) if needs else None,
        address=_read_address(patient),
        referral=any(k.startswith("ServiceRequest/") for k in res),
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
    if ADDRESS in drop:
        bundle = _without_address(bundle)
    entries = bundle.get("entry", [])
    gone = {name for e in entries if _carries(e["resource"], drop) for name in entry_names(e)}
    if not gone:
        return bundle

    def dropped(value: Any) -> bool:
        ref = value.get("reference") if isinstance(value, dict) else None
        return isinstance(ref, str) and ref in gone

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node if not dropped(v)]
        return node

    kept = [e for e in entries if not gone.intersection(entry_names(e))]
    return scrub({**bundle, "entry": kept})  # type: ignore[no-any-return]


def _without_address(bundle: dict[str, Any]) -> dict[str, Any]:
    """The Bundle with no Patient.address (a copy; the stored Bundle is not changed)."""
    entries = []
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient" and "address" in resource:
            resource = {k: v for k, v in resource.items() if k != "address"}
            entry = {**entry, "resource": resource}
        entries.append(entry)
    return {**bundle, "entry": entries}


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate against the FHIR R4 (R4B models) Bundle schema; raises ValueError."""
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


__all__ = [
    "SYSTEMS",
    "Address",
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
    "resolve",
    "resources_by_ref",
    "to_bundle",
    "validate_bundle",
]
