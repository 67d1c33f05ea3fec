"""Swedish patient and organisation identifiers.

Personnummer and samordningsnummer carry a Luhn check digit; reservnummer are local and
carry none; HSA-ids name organisations and people in Swedish health care. Errors never
repeat the identifier itself: an exception text may end up in a log or an ACK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from urllib.parse import quote


class IdentifierKind(StrEnum):
    PERSONNUMMER = "personnummer"
    SAMORDNINGSNUMMER = "samordningsnummer"
    RESERVNUMMER = "reservnummer"


SYSTEMS: dict[IdentifierKind, str] = {
    IdentifierKind.PERSONNUMMER: "http://electronichealth.se/identifier/personnummer",
    IdentifierKind.SAMORDNINGSNUMMER: "http://electronichealth.se/identifier/samordningsnummer",
    IdentifierKind.RESERVNUMMER: "http://electronichealth.se/identifier/nationelltReservnummer",
}
HSA_SYSTEM = "urn:oid:1.2.752.29.4.19"
# A reservnummer a region assigns is not a national one (hl7se.fhir.base keeps the
# nationelltReservnummer slice for Skatteverket's): its FHIR system is the region's OID.
REGIONAL_RESERVNUMMER_OIDS = frozenset({"1.2.752.97.3.1.3"})  # Region Stockholm
KIND_BY_SYSTEM: dict[str, IdentifierKind] = {v: k for k, v in SYSTEMS.items()} | {
    f"urn:oid:{oid}": IdentifierKind.RESERVNUMMER for oid in REGIONAL_RESERVNUMMER_OIDS
}
# A unit code that is not an HSA-id (a TakeCare ward code, an unmapped MSH-4): only its sender
# knows what it means, so the system names the sender (see local_unit_system).
LOCAL_UNIT_SYSTEM = "https://brygga.dev/fhir/NamingSystem/local-unit-code"

# OIDs used by RIV-TA services and in HL7 v2 assigning authorities; accepted as synonyms.
OID_KINDS: dict[str, IdentifierKind] = {
    "1.2.752.129.2.1.3.1": IdentifierKind.PERSONNUMMER,
    "1.2.752.129.2.1.3.3": IdentifierKind.SAMORDNINGSNUMMER,
    "1.2.752.129.2.1.3.2": IdentifierKind.RESERVNUMMER,
    "1.2.752.97.3.1.3": IdentifierKind.RESERVNUMMER,  # Region Stockholm reservnummer
}
HSA_OIDS = frozenset({"1.2.752.29.4.19", "1.2.752.129.2.1.4.1"})

# ASCII only: \d alone would also match other scripts' digits.
_PNR = re.compile(r"^([0-9]{8})[-+]?([0-9]{4})$")
_HSA = re.compile(r"^SE[0-9]{10}-[0-9A-Za-z]{1,31}$")
_RESERV = re.compile(r"^[0-9A-Za-z-]{4,20}$")


LOCAL_IDENTIFIER_SYSTEM = "https://brygga.dev/fhir/NamingSystem/local-identifier"


def local_identifier_system(kind: str, issuer: str) -> str:
    """The system of a sender's own business identifier (visit, document or referral number),
    scoped by kind and by the sender that issued it: the same number from two senders, or of
    two kinds, never collides."""
    return f"{LOCAL_IDENTIFIER_SYSTEM}/{quote(kind, safe='')}/{quote(issuer, safe='')}"


def local_unit_system(issuer: str = "") -> str:
    """The identifier system of a unit code that is not an HSA-id, scoped by who issued it.

    ``issuer`` is the HSA-id (or raw MSH-4) of the sender that uses the code; empty for a
    sender's own code, which has no issuer above it.
    """
    return f"{LOCAL_UNIT_SYSTEM}/{quote(issuer, safe='')}" if issuer else LOCAL_UNIT_SYSTEM


class InvalidIdentifier(ValueError):
    """An identifier failed validation. The message names the rule, never the value."""


def luhn_ok(digits: str) -> bool:
    """The Luhn check as Skatteverket applies it: over the last ten digits (YYMMDDNNNC)."""
    total = 0
    for i, ch in enumerate(digits):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def luhn_check_digit(nine: str) -> str:
    """The check digit that makes ``nine + digit`` pass :func:`luhn_ok`."""
    for c in "0123456789":
        if luhn_ok(nine + c):
            return c
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class PatientId:
    """A validated patient identifier, normalised (12 digits, no separator, for numbers)."""

    kind: IdentifierKind
    value: str
    # The FHIR system when it is not the kind's national one (a regional reservnummer's OID).
    # Not part of equality: the patient is keyed by kind and value (``system``).
    issuer_system: str = field(default="", compare=False)

    @property
    def system(self) -> str:
        """The kind's national system: what the patient key and consent records use."""
        return SYSTEMS[self.kind]

    @property
    def fhir_system(self) -> str:
        """Identifier.system in a Bundle (hl7se.fhir.base: a region's reservnummer by its OID)."""
        return self.issuer_system or SYSTEMS[self.kind]

    @classmethod
    def from_fhir(cls, system: str, value: str) -> PatientId:
        """A Bundle's identifier back (KIND_BY_SYSTEM must know the system)."""
        kind = KIND_BY_SYSTEM[system]
        return cls(kind, value, "" if system == SYSTEMS[kind] else system)

    def __repr__(self) -> str:  # never show the number itself
        return f"PatientId(kind={self.kind.value!r}, value=<redacted>)"

    __str__ = __repr__


def parse_identity_number(raw: str) -> PatientId:
    """Validate a personnummer or samordningsnummer (12 digits, optional separator).

    A samordningsnummer is a personnummer whose day is increased by 60.
    """
    m = _PNR.match(raw.strip())
    if not m:
        raise InvalidIdentifier("expected 12 digits YYYYMMDDNNNC (optionally with - or +)")
    digits = m.group(1) + m.group(2)
    year, month, day = int(digits[0:4]), int(digits[4:6]), int(digits[6:8])
    kind = IdentifierKind.PERSONNUMMER
    if day > 60:
        kind, day = IdentifierKind.SAMORDNINGSNUMMER, day - 60
    try:
        date(year, month, day)
    except ValueError:
        raise InvalidIdentifier(f"{kind.value}: the date part is not a valid date") from None
    if not luhn_ok(digits[2:]):
        raise InvalidIdentifier(f"{kind.value}: check digit does not match (Luhn)")
    return PatientId(kind, digits)


def parse_reservnummer(raw: str, issuer_oid: str = "") -> PatientId:
    """Reservnummer are assigned locally; letters are allowed and there is no check digit.

    ``issuer_oid`` (the assigning authority, e.g. CX-4.2) names a regional reservnummer."""
    value = raw.strip()
    if not _RESERV.match(value):
        raise InvalidIdentifier("reservnummer: 4-20 letters, digits or '-' expected")
    oid = issuer_oid.removeprefix("urn:oid:")
    issuer = f"urn:oid:{oid}" if oid in REGIONAL_RESERVNUMMER_OIDS else ""
    return PatientId(IdentifierKind.RESERVNUMMER, value, issuer)


def parse_patient_id(kind: IdentifierKind, raw: str) -> PatientId:
    """An identifier of the given kind: a reservnummer as it is, a number Luhn-checked."""
    if kind is IdentifierKind.RESERVNUMMER:
        return parse_reservnummer(raw)
    return parse_identity_number(raw)


def synthetic_personnummer(n: int) -> str:
    """A valid, made-up personnummer (born 1930-1949), different for each n < 5,000.

    For tests, benchmarks and demos: data that passes every check without being anyone's.
    """
    year = 1930 + n % 20
    month = 1 + (n // 20) % 12
    day = 1 + (n // 240) % 28
    serial = 100 + n % 900
    nine = f"{year % 100:02d}{month:02d}{day:02d}{serial:03d}"
    return f"{year // 100}{nine}{luhn_check_digit(nine)}"


def is_hsa_id(raw: str) -> bool:
    """HSA-id: 'SE', the ten-digit organisation number, '-', then a local part."""
    return bool(_HSA.match(raw))
