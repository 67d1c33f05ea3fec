"""LUS events as a FHIR code system: the messages of the regional discharge routine."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

LUS_EVENT_SYSTEM = "https://brygga.dev/fhir/CodeSystem/lus-event"


class LusEvent(StrEnum):
    INSKRIVNINGSMEDDELANDE = "inskrivningsmeddelande"
    PLANERINGSUNDERLAG = "planeringsunderlag"
    UTSKRIVNINGSKLAR = "utskrivningsklar"
    KALLELSE_SIP = "kallelse-sip"
    UTSKRIVNINGSMEDDELANDE = "utskrivningsmeddelande"
    SIP_PLAN = "sip-plan"
    AVVIKELSE = "avvikelse"
    MAKULERA_INSKRIVNING = "makulera-inskrivning"
    MAKULERA_UTSKRIVNING = "makulera-utskrivning"
    MAKULERA_UTSKRIVNINGSKLAR = "makulera-utskrivningsklar"
    PATIENTSAMMANSLAGNING = "patient-sammanslagning"
    # What comes back: the parties' side of the routine (municipality, primary care, providers).
    KVITTENS = "kvittens"
    FAST_VARDKONTAKT = "fast-vardkontakt"
    SIP_AVBOJD = "sip-avbojd"
    INFORMATIONSBEGARAN = "informationsbegaran"
    INFORMATIONSSVAR = "informationssvar"
    INSATSER_STARTADE = "insatser-startade"

    @property
    def display(self) -> str:
        return _DISPLAY[self][0]

    @property
    def definition(self) -> str:
        return _DISPLAY[self][1]

    @property
    def has_careplan(self) -> bool:
        return self in _WITH_CAREPLAN

    @property
    def retracts(self) -> LusEvent | None:
        """For a cancellation: the event whose deliveries it retracts."""
        return _RETRACTS.get(self)


_DISPLAY: dict[LusEvent, tuple[str, str]] = {
    LusEvent.INSKRIVNINGSMEDDELANDE: (
        "Inskrivningsmeddelande",
        "Admission notice: a patient judged to need support after discharge was admitted.",
    ),
    LusEvent.PLANERINGSUNDERLAG: (
        "Planeringsunderlag",
        "Planning information: assessments and the preliminary discharge date (PUD).",
    ),
    LusEvent.UTSKRIVNINGSKLAR: (
        "Utskrivningsklar",
        "Ready for discharge, with the physician's decision time; starts the LUS clocks.",
    ),
    LusEvent.KALLELSE_SIP: ("Kallelse till SIP", "Invitation to coordinated individual planning."),
    LusEvent.UTSKRIVNINGSMEDDELANDE: (
        "Information vid utskrivning",
        "Discharge information: date and time, medication list, devices, referrals.",
    ),
    LusEvent.SIP_PLAN: ("SIP-plan", "The coordinated individual plan."),
    LusEvent.AVVIKELSE: ("Avvikelse", "Deviation report to the responsible party."),
    LusEvent.MAKULERA_INSKRIVNING: (
        "Makulerat inskrivningsmeddelande",
        "Cancellation of an admission; retracts the admission notice.",
    ),
    LusEvent.MAKULERA_UTSKRIVNING: (
        "Makulerad utskrivning",
        "Cancellation of a discharge; retracts the discharge information.",
    ),
    LusEvent.MAKULERA_UTSKRIVNINGSKLAR: (
        "Makulerad utskrivningsklar",
        "Cancellation of ready-for-discharge; retracts it and stops its clocks.",
    ),
    LusEvent.PATIENTSAMMANSLAGNING: (
        "Patientsammanslagning",
        "Two identities of one patient were merged (HL7 A40): the prior identifier is "
        "replaced by the surviving one. Internal to the gateway; not a LUS message.",
    ),
    LusEvent.KVITTENS: (
        "Kvittens",
        "A party's receipt of a notice, with the patient's current needs and services.",
    ),
    LusEvent.FAST_VARDKONTAKT: (
        "Fast vårdkontakt",
        "Primary care names the patient's fast vårdkontakt: name, title, direct phone.",
    ),
    LusEvent.SIP_AVBOJD: (
        "SIP avböjd",
        "A SIP was offered and the patient declined it.",
    ),
    LusEvent.INFORMATIONSBEGARAN: (
        "Begäran om information",
        "A party asks another for more information about the patient's stay.",
    ),
    LusEvent.INFORMATIONSSVAR: (
        "Svar på begäran om information",
        "The answer to a request for more information.",
    ),
    LusEvent.INSATSER_STARTADE: (
        "Insatser startade",
        "The municipality's services (hemtjänst, SÄBO) started after the discharge.",
    ),
}
_WITH_CAREPLAN = frozenset(
    {
        LusEvent.PLANERINGSUNDERLAG,
        LusEvent.UTSKRIVNINGSKLAR,
        LusEvent.KALLELSE_SIP,
        LusEvent.UTSKRIVNINGSMEDDELANDE,
        LusEvent.SIP_PLAN,
    }
)
_RETRACTS = {
    LusEvent.MAKULERA_INSKRIVNING: LusEvent.INSKRIVNINGSMEDDELANDE,
    LusEvent.MAKULERA_UTSKRIVNING: LusEvent.UTSKRIVNINGSMEDDELANDE,
    LusEvent.MAKULERA_UTSKRIVNINGSKLAR: LusEvent.UTSKRIVNINGSKLAR,
}


def code_system() -> dict[str, Any]:
    """The FHIR CodeSystem resource for the LUS events (served and validated in tests)."""
    return {
        "resourceType": "CodeSystem",
        "id": "lus-event",
        "url": LUS_EVENT_SYSTEM,
        "name": "LusEvent",
        "title": "LUS-händelser (utskrivningsprocessen)",
        "status": "draft",
        "content": "complete",
        "caseSensitive": True,
        "concept": [
            {"code": e.value, "display": e.display, "definition": e.definition} for e in LusEvent
        ],
    }
