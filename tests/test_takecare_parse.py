"""TakeCare HL7 v2 inbound: golden cases, every rejection rule, the public corpus, fuzzing.

A message either maps to the canonical Bundle exactly as the golden file says, or is
rejected with the segment, field and table 0357 code the sender needs, and without any
patient data in the text or the ACK.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.takecare import hl7in
from adapters.takecare.ack import build_ack, parse_ack
from adapters.takecare.hl7in import Hl7Rejection, Inbound, parse
from adapters.takecare.mappings_cli import parse_case
from gateway.model.bundle import read_bundle, to_bundle, validate_bundle
from gateway.model.identifiers import IdentifierKind, local_unit_system
from mappings import MAPPINGS_DIR

GOLDEN = MAPPINGS_DIR / "takecare" / "golden"
# The public HL7 v2 corpus (copied from ../shared/corpus with its licences).
CORPUS = Path(__file__).parent / "corpus" / "hl7v2"
PNR = "191212121212"
PNR_FORMS = (PNR, PNR[2:], "19121212-1212", "121212-1212")
BASE = (GOLDEN / "adt_a01_full.hl7").read_bytes().decode("utf-8")
BASE_SEGMENTS = BASE.rstrip("\r").split("\r")
CONTROL_ID = "TC20250310-0001"


def _msg(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("utf-8")


def _replace_segment(name: str, new: str | None, occurrence: int = 1) -> bytes:
    """BASE with the n-th segment called ``name`` replaced (None: deleted)."""
    out, seen = [], 0
    for seg in BASE_SEGMENTS:
        if seg.startswith(name + "|"):
            seen += 1
            if seen == occurrence:
                if new is not None:
                    out.append(new)
                continue
        out.append(seg)
    return _msg(*out)


def _set_field(
    name: str, field: int, value: str, occurrence: int = 1, base: bytes | None = None
) -> bytes:
    """BASE with field ``name-field`` set to ``value`` (MSH fields numbered as in HL7)."""
    seen = 0
    out = []
    segments = base.decode("utf-8").rstrip("\r").split("\r") if base else BASE_SEGMENTS
    for seg in segments:
        if seg.startswith(name + "|"):
            seen += 1
            if seen == occurrence:
                parts = seg.split("|")
                idx = field - 1 if name == "MSH" else field
                parts += [""] * (idx + 1 - len(parts))
                parts[idx] = value
                seg = "|".join(parts)
        out.append(seg)
    return _msg(*out)


def _reject(raw: bytes) -> Hl7Rejection:
    with pytest.raises(Hl7Rejection) as info:
        parse(raw)
    return info.value


def _assert_clean(rej: Hl7Rejection) -> None:
    """No patient identifier in the text, the exception or the ACK built from it."""
    ack = build_ack(rej, rej.ack_code, ack_control_id="ACK1", error=rej)
    for form in PNR_FORMS:
        assert form not in rej.text and form not in str(rej) and form not in repr(rej)
        assert form.encode() not in ack


# --------------------------------------------------------------------------- golden


def _golden_cases() -> list[Path]:
    return sorted(GOLDEN.glob("*.hl7"))


def test_there_are_golden_cases() -> None:
    names = {p.stem for p in _golden_cases()}
    assert {"adt_a01_full", "adt_a01_latin1", "adt_a01_reservnummer"} <= names
    assert "adt_a01_samordningsnummer" in names
    # one or more for every message type (tests/test_takecare_types.py checks each in detail)
    for prefix in ("adt_a02", "adt_a03", "adt_a08", "adt_a11", "adt_a25", "adt_a40", "mdm_t02"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert any(n.startswith("ref_i12") for n in names)
    assert sum(n.startswith("episode_") for n in names) == 6


@pytest.mark.parametrize("path", _golden_cases(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    inbound = parse_case(path, hl7in.MAPPING)
    bundle = to_bundle(inbound.canonical, message_id="golden")
    expected_path = path.with_suffix(".json")
    if os.environ.get("BRYGGA_UPDATE_GOLDEN") == "1":
        expected_path.write_text(json.dumps(bundle, ensure_ascii=False, indent=2) + "\n", "utf-8")
    expected = json.loads(expected_path.read_text("utf-8"))
    assert json.loads(json.dumps(bundle)) == expected
    validate_bundle(bundle)
    view = read_bundle(bundle)
    assert view.message_id == "golden"
    assert view.sender_hsa_id.startswith("SE2321000016-")


def test_full_admission_details() -> None:
    inbound = parse(BASE.encode("utf-8"))
    assert (inbound.control_id, inbound.message_type, inbound.version) == (
        CONTROL_ID,
        "ADT^A01",
        "2.5",
    )
    assert (inbound.sending_application, inbound.sending_facility) == (
        "TAKECARE",
        "SE2321000016-EX01",
    )
    assert (inbound.receiving_application, inbound.receiving_facility) == ("BRYGGA", "BRYGGA")
    assert (inbound.accept_ack_type, inbound.application_ack_type) == ("AL", "NE")
    c = inbound.canonical
    assert [(p.kind, p.value) for p in c.patient_ids] == [(IdentifierKind.PERSONNUMMER, PNR)]
    assert (c.family, c.given, c.birth_date, c.gender) == (
        "Tolvansson",
        "Tolvan Olof",
        "1912-12-12",
        "male",
    )
    assert c.occurred_at == datetime(2025, 3, 10, 14, 20, tzinfo=hl7in.STOCKHOLM)
    assert c.occurred_at.utcoffset() == timedelta(hours=1)
    assert c.listed_clinic is not None and c.listed_clinic.name == "Vårdcentralen Årsta"
    assert [p.role for p in c.care_parties] == ["hemtjanst", "hemtjanst-natt"]  # AT ignored
    assert c.consent is not None and c.consent.basis == "samtycke"
    assert c.encounter_id == "V2025-0001" and c.ward_hsa_id == "SE2321000016-EX12"


def test_inbound_repr_carries_no_patient_data() -> None:
    inbound = parse(BASE.encode())
    assert "Tolvan" not in repr(inbound) and PNR not in repr(inbound)
    assert CONTROL_ID in repr(inbound)


def test_latin1_message_and_mapped_unit_codes() -> None:
    raw = (GOLDEN / "adt_a01_latin1.hl7").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    c = parse(raw).canonical
    assert (c.family, c.given) == ("Ödegård", "Åsa-Britt")
    assert (c.sender_hsa_id, c.sender_name) == ("SE2321000016-EX01", "Exempelsjukhuset Solna")
    assert c.ward_hsa_id == "SE2321000016-EX12"
    assert c.listed_clinic is not None and c.listed_clinic.name == "Husläkarna & BVC Södermalm"
    assert c.occurred_at == datetime(2025, 3, 13, 9, 15, tzinfo=hl7in.STOCKHOLM)  # from MSH-7


def test_samordningsnummer_and_offsets() -> None:
    c = parse((GOLDEN / "adt_a01_samordningsnummer.hl7").read_bytes()).canonical
    assert c.patient_ids[0].kind is IdentifierKind.SAMORDNINGSNUMMER
    assert c.occurred_at.utcoffset() == timedelta(hours=1)
    assert c.encounter_class == "EMER"
    assert [p.role for p in c.care_parties] == ["sabo", "rehab"]  # ROL-2 DE dropped
    assert c.care_parties[0].name == "Vård & Omsorg Söder AB"  # \T\ unescaped


def test_reservnummer_protected_and_foreign_ids_ignored() -> None:
    c = parse((GOLDEN / "adt_a01_reservnummer.hl7").read_bytes()).canonical
    assert [p.kind for p in c.patient_ids] == [IdentifierKind.RESERVNUMMER]
    assert c.protected_identity is True
    assert c.consent is not None and c.consent.basis == "sparr"


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r\r\n", "\n\n"])
def test_segment_separators(sep: str) -> None:
    raw = sep.join(BASE_SEGMENTS).encode("utf-8")
    assert parse(raw).canonical == parse(BASE.encode("utf-8")).canonical


def test_mllp_bytes_bom_and_blank_lines_are_tolerated() -> None:
    raw = b"\x0b\xef\xbb\xbf" + BASE.encode("utf-8") + b"\r\n\x1c\r"
    assert parse(raw).canonical == parse(BASE.encode("utf-8")).canonical


def test_undeclared_latin1_falls_back() -> None:
    raw = _set_field("MSH", 18, "").decode("utf-8").encode("latin-1")
    clinic = parse(raw).canonical.listed_clinic
    assert clinic is not None and clinic.name == "Vårdcentralen Årsta"


def test_declared_latin1_is_not_read_as_utf8() -> None:
    raw = _set_field("MSH", 18, "8859/1").decode("utf-8").encode("latin-1")
    clinic = parse(raw).canonical.listed_clinic
    assert clinic is not None and clinic.name == "Vårdcentralen Årsta"


def test_escape_sequences_in_names() -> None:
    raw = _set_field("PID", 5, r"Tolvans\F\\S\son\E\^\XC3A5\sa\.br\X^^^^^L")
    c = parse(raw).canonical
    assert c.family == "Tolvans|^son\\"
    assert c.given == "åsa X"


def test_other_delimiters() -> None:
    text = BASE.replace("^", "#").replace("MSH|#~\\&|", "MSH|#~\\&|")
    c = parse(text.encode("utf-8")).canonical
    assert c.family == "Tolvansson" and c.listed_clinic is not None


# --------------------------------------------------------------------------- identifiers


@pytest.mark.parametrize(
    "pid3,kind",
    [
        (f"{PNR}^^^&1.2.752.129.2.1.3.1&ISO", IdentifierKind.PERSONNUMMER),
        (f"{PNR}^^^1.2.752.129.2.1.3.1", IdentifierKind.PERSONNUMMER),
        (f"{PNR}^^^^NNSWE", IdentifierKind.PERSONNUMMER),
        ("19121212-1212^^^^pn", IdentifierKind.PERSONNUMMER),
        ("196002751243^^^^PNR", IdentifierKind.SAMORDNINGSNUMMER),
        ("196002751243^^^&1.2.752.129.2.1.3.3&ISO", IdentifierKind.SAMORDNINGSNUMMER),
        ("RES-4711^^^^RES", IdentifierKind.RESERVNUMMER),
        ("123456^^^MRN^MR~RES-4711^^^^RNR", IdentifierKind.RESERVNUMMER),
    ],
)
def test_identifier_kinds(pid3: str, kind: IdentifierKind) -> None:
    assert parse(_set_field("PID", 3, pid3)).canonical.patient_ids[0].kind is kind


def test_several_identifiers_are_kept_once_each() -> None:
    pid3 = f"RES-4711^^^^RNR~{PNR}^^^^PNR~19121212-1212^^^^PNR~999^^^US^SS"
    c = parse(_set_field("PID", 3, pid3)).canonical
    assert [p.kind for p in c.patient_ids] == [
        IdentifierKind.RESERVNUMMER,
        IdentifierKind.PERSONNUMMER,
    ]
    assert c.primary_id.kind is IdentifierKind.PERSONNUMMER


def test_local_authority_from_mapping_data() -> None:
    mapping = hl7in.load_mapping()
    local = dataclasses.replace(mapping, authorities={"TAKECARE-RES": IdentifierKind.RESERVNUMMER})
    raw = _set_field("PID", 3, "RES-4711^^^TAKECARE-RES")
    assert parse(raw, mapping=local).canonical.patient_ids[0].kind is IdentifierKind.RESERVNUMMER
    assert _reject_with(raw, mapping).hl7_error_code == 101


def _reject_with(raw: bytes, mapping: hl7in.TakeCareMapping) -> Hl7Rejection:
    with pytest.raises(Hl7Rejection) as info:
        parse(raw, mapping=mapping)
    return info.value


# A foreign person number (table 0203 PN, e.g. a Norwegian fødselsnummer): any text that
# HL7 can carry in CX-1 without delimiters.
_FOREIGN = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"), exclude_characters="|^~\\&"
    ),
    min_size=1,
    max_size=20,
).filter(lambda v: v.strip() == v and v.strip())


@settings(max_examples=150, deadline=None)
@given(
    _FOREIGN,
    st.sampled_from(["NO", "DK", "FI", "", "NOR&2.16.578.1.12.4.1.4.1&ISO"]),
    st.booleans(),
)
def test_pid3_pn_of_another_country_never_fails_a_swedish_repetition(
    value: str, authority: str, pn_first: bool
) -> None:
    """PN names no country: only repetitions that claim to be Swedish are checked, so a
    valid personnummer in another repetition wins whatever the PN repetition holds."""
    reps = [f"{value}^^^{authority}^PN", f"{PNR}^^^^PNR"]
    pid3 = "~".join(reps if pn_first else reps[::-1])
    ids = parse(_set_field("PID", 3, pid3)).canonical.patient_ids
    assert ids[0].value == PNR and ids[0].kind is IdentifierKind.PERSONNUMMER
    assert all(p.value == PNR for p in ids)


def test_pid3_pn_is_read_as_swedish_only_when_it_is_one() -> None:
    swedish = parse(_set_field("PID", 3, "19121212-1212^^^^PN")).canonical.patient_ids
    assert [p.kind for p in swedish] == [IdentifierKind.PERSONNUMMER]
    # a PN that is no valid Swedish number is another country's: skipped, not a Luhn error
    assert _reject(_set_field("PID", 3, "191212121213^^^^PN")).hl7_error_code == 101
    # a repetition that claims to be Swedish is still checked, whatever PN says
    claimed = f"{PNR}^^^^PN~191212121213^^^^PNR"
    assert _reject(_set_field("PID", 3, claimed)).hl7_error_code == 102
    by_oid = "191212121213^^^&1.2.752.129.2.1.3.1&ISO^PN"
    assert _reject(_set_field("PID", 3, by_oid)).hl7_error_code == 102


def test_mapping_refuses_a_type_code_listed_as_swedish_and_generic(tmp_path: Path) -> None:
    for name in ("adt.toml", "events.toml", "fields.toml", "facilities.toml"):
        text = (MAPPINGS_DIR / "takecare" / name).read_text("utf-8")
        if name == "adt.toml":
            text = text.replace("[pid3.type_codes]\n", '[pid3.type_codes]\nPN = "personnummer"\n')
        (tmp_path / name).write_text(text, "utf-8")
    with pytest.raises(ValueError, match="listed twice"):
        hl7in.load_mapping(tmp_path)


# --------------------------------------------------------------------------- unit codes


def test_local_ward_code_is_accepted_and_kept_as_sent() -> None:
    """A ward code that is neither an HSA-id nor mapped (real feeds use local codes)."""
    inbound = parse(_set_field("PV1", 3, "GER 12^^^SE2321000016-EX01"))
    c = inbound.canonical
    assert (c.ward_hsa_id, c.ward_code) == ("", "GER 12")
    assert hl7in.unmapped_codes(c) == [("PV1-3", "GER 12")]
    bundle = to_bundle(c, message_id="m1")
    validate_bundle(bundle)
    (encounter,) = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter"
    ]
    assert encounter["location"] == [
        {
            "location": {
                "identifier": {
                    "system": local_unit_system("SE2321000016-EX01"),
                    "value": "GER 12",
                }
            }
        }
    ]
    # a mapped code or an HSA-id is no unmapped code
    for ward in ("EXAMPLE-KS-AVD12", "SE2321000016-EX12", ""):
        c = parse(_set_field("PV1", 3, ward)).canonical
        assert c.ward_code == "" and hl7in.unmapped_codes(c) == []


def test_missing_msh4_falls_back_to_the_configured_sender() -> None:
    raw = _set_field("MSH", 4, "")
    rej = _reject(raw)  # without a configured sender: AE 101 naming MSH-4, as before
    assert (rej.ack_code, rej.location, rej.hl7_error_code) == ("AE", "MSH-4", 101)
    inbound = parse(raw, default_sender="SE2321000016-EX01")
    assert inbound.sending_facility == ""  # the header says what MSH said (the ACK's MSH-6)
    assert inbound.canonical.sender_hsa_id == "SE2321000016-EX01"
    assert hl7in.unmapped_codes(inbound.canonical) == []
    mapped = parse(raw, default_sender="EXAMPLE-KS").canonical
    assert (mapped.sender_hsa_id, mapped.sender_name) == (
        "SE2321000016-EX01",
        "Exempelsjukhuset Solna",
    )
    # an MSH-4 that is sent wins over the configured sender
    sent = parse(_set_field("MSH", 4, "EXAMPLE-DS"), default_sender="EXAMPLE-KS").canonical
    assert sent.sender_hsa_id == "SE2321000016-EX02"


def test_unmapped_msh4_is_kept_raw_and_listed() -> None:
    c = parse(_set_field("MSH", 4, "TCKS")).canonical
    assert c.sender_hsa_id == "TCKS"
    assert hl7in.unmapped_codes(c) == [("MSH-4", "TCKS")]
    c = parse(_set_field("PV1", 3, "G12", base=_set_field("MSH", 4, "TCKS"))).canonical
    assert hl7in.unmapped_codes(c) == [("MSH-4", "TCKS"), ("PV1-3", "G12")]


@pytest.mark.parametrize(
    "code,disposition",
    [
        ("01", "home"),
        ("02", "other-hcf"),  # FHIR "hosp" is hospice
        ("08", "home"),
        ("09", "oth"),
        ("30", "oth"),
        ("40", "exp"),
        ("41", "exp"),
        ("42", "exp"),
        ("SJUKHUS", "other-hcf"),
    ],
)
def test_discharge_disposition_table_0112(code: str, disposition: str) -> None:
    raw = (GOLDEN / "adt_a03_discharge_sabo.hl7").read_bytes()
    c = parse(_set_field("PV1", 36, code, base=raw)).canonical
    assert c.discharge_disposition == disposition


def test_every_code_of_table_0112_is_mapped() -> None:
    """HL7 v2.5 table 0112 lists 01-09, 20, 30, 40-42 (and ranges for local use): each has a
    documented mapping (checked against hl7apy's copy of the table)."""
    from hl7apy.v2_5.tables import TABLES

    codes = {c for c in TABLES["HL70112"][1] if c.isdigit()}
    assert codes == {
        "01",
        "02",
        "03",
        "04",
        "05",
        "06",
        "07",
        "08",
        "09",
        "20",
        "30",
        "40",
        "41",
        "42",
    }
    assert codes <= set(hl7in.MAPPING.discharge_disposition)


# --------------------------------------------------------------------------- other fields


@pytest.mark.parametrize(
    "segment,field,value,attr,expected",
    [
        ("PID", 7, "1945", "birth_date", "1945"),
        ("PID", 7, "194501", "birth_date", "1945-01"),
        ("PID", 7, "19450101120000+0100", "birth_date", "1945-01-01"),
        ("PID", 7, "", "birth_date", ""),
        ("PID", 8, "f", "gender", "female"),
        ("PID", 8, "", "gender", "unknown"),
        ("PV1", 2, "O", "encounter_class", "AMB"),
        ("PV1", 2, "", "encounter_class", "IMP"),
        ("PV1", 3, "EXAMPLE-KS-AVD12", "ward_hsa_id", "SE2321000016-EX12"),
        ("PV1", 3, "", "ward_hsa_id", ""),
        ("PID", 39, "SF", "protected_identity", True),
        ("PD1", 12, "Y", "protected_identity", True),
        ("PD1", 12, "N", "protected_identity", False),
        ("PV1", 44, "", "admitted_at", None),
    ],
)
def test_field_mapping(segment: str, field: int, value: str, attr: str, expected: object) -> None:
    assert getattr(parse(_set_field(segment, field, value)).canonical, attr) == expected


def test_timestamps() -> None:
    c = parse(_set_field("EVN", 2, "20250710142000.25")).canonical
    assert c.occurred_at == datetime(2025, 7, 10, 14, 20, 0, 250000, tzinfo=hl7in.STOCKHOLM)
    assert c.occurred_at.utcoffset() == timedelta(hours=2)  # summer time
    c = parse(_set_field("EVN", 2, "202507101420-0330")).canonical
    assert c.occurred_at == datetime(2025, 7, 10, 14, 20, tzinfo=timezone(-timedelta(hours=3.5)))
    c = parse(_set_field("EVN", 2, "")).canonical
    assert c.occurred_at == datetime(2025, 3, 10, 14, 25, 1, tzinfo=hl7in.STOCKHOLM)  # MSH-7


def test_listed_clinic_hsa_in_xon3_and_absent() -> None:
    c = parse(_set_field("PD1", 3, "VC Test^^SE2321000016-VC01")).canonical
    assert c.listed_clinic is not None and c.listed_clinic.hsa_id == "SE2321000016-VC01"
    assert parse(_set_field("PD1", 3, "")).canonical.listed_clinic is None
    assert parse(_replace_segment("PD1", None)).canonical.listed_clinic is None


def test_no_zsc_means_no_consent_recorded() -> None:
    assert parse(_replace_segment("ZSC", None)).canonical.consent is None


# --------------------------------------------------------------------------- rejections

REJECTIONS = [
    # (id, raw, ack, segment, sequence, field, code, text fragment)
    ("empty", b"", "AR", "MSH", 1, None, 100, "first segment must be MSH"),
    ("not-hl7", b"hello world, this is not HL7", "AR", "MSH", 1, None, 100, "must be MSH"),
    ("pid-first", _msg(*BASE_SEGMENTS[2:]), "AR", "MSH", 1, None, 100, "must be MSH"),
    ("bad-encoding", BASE.replace("^~\\&", "^^\\&", 1).encode(), "AR", "MSH", 1, 2, 102, "MSH-2"),
    ("charset", _set_field("MSH", 18, "UNICODE UTF-16"), "AR", "MSH", 1, 18, 103, "MSH-18"),
    ("version", _set_field("MSH", 12, "2.6"), "AR", "MSH", 1, 12, 203, "MSH-12"),
    ("no-version", _set_field("MSH", 12, ""), "AR", "MSH", 1, 12, 101, "MSH-12"),
    ("type", _set_field("MSH", 9, "ORU^R01^ORU_R01"), "AR", "MSH", 1, 9, 200, "message type"),
    ("trigger", _set_field("MSH", 9, "ADT^A04^ADT_A01"), "AR", "MSH", 1, 9, 201, "trigger"),
    ("no-type", _set_field("MSH", 9, ""), "AR", "MSH", 1, 9, 101, "MSH-9"),
    ("no-control-id", _set_field("MSH", 10, ""), "AR", "MSH", 1, 10, 101, "MSH-10"),
    ("two-msh", _msg(*BASE_SEGMENTS, BASE_SEGMENTS[0]), "AR", "MSH", 2, None, 100, "second MSH"),
    ("no-facility", _set_field("MSH", 4, ""), "AE", "MSH", 1, 4, 101, "MSH-4"),
    ("no-pid", _replace_segment("PID", None), "AE", "PID", 1, None, 100, "PID segment"),
    ("no-pv1", _replace_segment("PV1", None), "AE", "PV1", 1, None, 100, "PV1 segment"),
    ("pid3-empty", _set_field("PID", 3, ""), "AE", "PID", 1, 3, 101, "no Swedish patient"),
    ("pid3-foreign", _set_field("PID", 3, "12345^^^MRN^MR"), "AE", "PID", 1, 3, 101, "no Swedish"),
    ("luhn", _set_field("PID", 3, "191212121213^^^^PNR"), "AE", "PID", 1, 3, 102, "Luhn"),
    ("date", _set_field("PID", 3, "191213121212^^^^PNR"), "AE", "PID", 1, 3, 102, "valid date"),
    ("snr-date", _set_field("PID", 3, "196002911243^^^^SNR"), "AE", "PID", 1, 3, 102, "date"),
    ("format", _set_field("PID", 3, "1212121212^^^^PNR"), "AE", "PID", 1, 3, 102, "12 digits"),
    ("reserv", _set_field("PID", 3, "R/1^^^^RNR"), "AE", "PID", 1, 3, 102, "reservnummer"),
    ("birth", _set_field("PID", 7, "19121312"), "AE", "PID", 1, 7, 102, "PID-7"),
    ("sex", _set_field("PID", 8, "X"), "AE", "PID", 1, 8, 103, "table 0001"),
    ("class", _set_field("PV1", 2, "Z"), "AE", "PV1", 1, 2, 103, "table 0004"),
    ("admit", _set_field("PV1", 44, "2025-03-10"), "AE", "PV1", 1, 44, 102, "timestamp"),
    ("evn2", _set_field("EVN", 2, "20251310"), "AE", "EVN", 1, 2, 102, "timestamp"),
    ("pv2-9", _set_field("PV2", 9, "tomorrow"), "AE", "PV2", 1, 9, 102, "timestamp"),
    ("pd1-3", _set_field("PD1", 3, "Vårdcentralen utan id"), "AE", "PD1", 1, 3, 102, "HSA-id"),
    ("rol4", _set_field("ROL", 4, "HT-42^Hemtjänst", 2), "AE", "ROL", 2, 4, 102, "HSA-id"),
    ("rol4-empty", _set_field("ROL", 4, "", 1), "AE", "ROL", 1, 4, 101, "ROL-4"),
    ("zsc2", _set_field("ZSC", 2, "kanske"), "AE", "ZSC", 1, 2, 103, "samtycke"),
    ("zsc2-empty", _set_field("ZSC", 2, ""), "AE", "ZSC", 1, 2, 101, "ZSC-2"),
    ("zsc3", _set_field("ZSC", 3, "igår"), "AE", "ZSC", 1, 3, 102, "timestamp"),
    ("zsc4", _set_field("ZSC", 4, "Dr Lena"), "AE", "ZSC", 1, 4, 102, "HSA-id"),
    (
        "line-break-in-field",
        _set_field("PID", 11, "Storgatan 1\nStockholm"),
        "AE",
        "PID",
        1,
        None,
        100,
        "line after PID",
    ),
]


@pytest.mark.parametrize(
    "raw,ack,segment,sequence,field,code,fragment",
    [r[1:] for r in REJECTIONS],
    ids=[r[0] for r in REJECTIONS],
)
def test_rejection_rules(
    raw: bytes,
    ack: str,
    segment: str,
    sequence: int,
    field: int | None,
    code: int,
    fragment: str,
) -> None:
    rej = _reject(raw)
    assert (rej.ack_code, rej.segment, rej.sequence, rej.field, rej.hl7_error_code) == (
        ack,
        segment,
        sequence,
        field,
        code,
    )
    assert fragment in rej.text
    _assert_clean(rej)
    if raw.startswith(b"MSH"):
        assert rej.header.control_id in (CONTROL_ID, "")
        assert rej.header.sending_facility in ("SE2321000016-EX01", "")


def test_luhn_rejection_text_and_location() -> None:
    rej = _reject(_set_field("PID", 3, "12345^^^MRN^MR~191212121213^^^^PNR"))
    assert rej.text == "PID-3: personnummer: check digit does not match (Luhn)"
    assert (rej.repetition, rej.component, rej.location) == (2, 1, "PID-3.1")
    assert rej.header.control_id == CONTROL_ID


def test_internal_errors_become_ae_207_without_values(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise ValueError(f"cannot handle {PNR}")

    monkeypatch.setattr(hl7in, "_map", broken)
    with structlog.testing.capture_logs() as logs:
        rej = _reject(BASE.encode())
    assert (rej.ack_code, rej.segment, rej.hl7_error_code) == ("AE", "MSH", 207)
    assert rej.header.control_id == CONTROL_ID
    assert logs and PNR not in repr(logs)
    _assert_clean(rej)


def test_rejection_is_an_exception_with_a_readable_str() -> None:
    rej = _reject(_set_field("ROL", 4, "HT-42^Hemtjänst", 2))
    assert isinstance(rej, Exception)
    assert str(rej).startswith("AE ROL[2]-4.1 (102): ROL-4:")


# --------------------------------------------------------------------------- ACK


def test_ack_for_accepted_message() -> None:
    inbound = parse(BASE.encode())
    ack = build_ack(inbound, "AA", ack_control_id="BRY-1")
    segs = ack.decode().split("\r")
    msh = segs[0].split("|")
    assert msh[2:6] == ["BRYGGA", "BRYGGA", "TAKECARE", "SE2321000016-EX01"]
    assert (msh[8], msh[9], msh[10], msh[11]) == ("ACK^A01^ACK", "BRY-1", "P", "2.5")
    assert segs[1] == f"MSA|AA|{CONTROL_ID}"
    assert ack.endswith(b"\r") and b"\n" not in ack
    assert parse_ack(ack) == ("AA", CONTROL_ID, None, "")


def test_ack_for_rejection_has_err() -> None:
    rej = _reject(_set_field("PID", 3, "191212121213^^^^PNR"))
    ack = build_ack(rej, "AE", ack_control_id="BRY-2", error=rej)
    segs = ack.decode().split("\r")
    assert segs[2] == (
        "ERR||PID^1^3^1^1|102^Data type error^HL70357|E||||"
        "PID-3: personnummer: check digit does not match (Luhn)"
    )
    code, control_id, location, text = parse_ack(ack)
    assert (code, control_id, location) == ("AE", CONTROL_ID, "PID^1^3^1^1")
    assert "Luhn" in text


def test_ack_for_old_versions_carries_err1() -> None:
    raw = _set_field("MSH", 12, "2.3")
    rej = _reject(_set_field("PID", 3, "", base=raw))
    assert rej.header.version == "2.3"
    ack = build_ack(rej, "AE", ack_control_id="BRY-3", error=rej).decode()
    assert ack.endswith("\rERR|PID^1^3^101&Required field missing&HL70357\r")  # ERR-1 only
    assert "|ACK^A01|BRY-3|P|2.3|" in ack.split("\r")[0]
    assert parse(raw).version == "2.3"


def test_ack_for_garbage_and_unsupported_version() -> None:
    rej = _reject(b"garbage")
    ack = build_ack(rej, "AR", ack_control_id="BRY-4", error=rej)
    msh = ack.decode().split("\r")[0].split("|")
    assert (msh[8], msh[11]) == ("ACK^^ACK", "2.5")  # no trigger to echo; the structure
    assert parse_ack(ack)[:3] == ("AR", "", "MSH^1")
    rej = _reject(_set_field("MSH", 12, "2.8"))
    msh = build_ack(rej, "AR", ack_control_id="X", error=rej).decode().split("\r")[0].split("|")
    assert msh[11] == "2.8"  # the ACK is written as the sender's version defines it
    rej = _reject(_set_field("MSH", 12, "3.0"))
    msh = build_ack(rej, "AR", ack_control_id="X", error=rej).decode().split("\r")[0].split("|")
    assert msh[11] == "2.5"  # a version without known ACK rules gets v2.5


def test_ack_keeps_the_character_set_and_escapes() -> None:
    raw = (GOLDEN / "adt_a01_latin1.hl7").read_bytes()
    ack = build_ack(parse(raw), "CA", ack_control_id="a|b^c")
    assert ack.decode("latin-1").split("\r")[0].endswith("|8859/1")
    assert b"|a\\F\\b\\S\\c|" in ack


def test_ack_code_is_checked() -> None:
    with pytest.raises(ValueError):
        build_ack(parse(BASE.encode()), "OK", ack_control_id="X")


def test_ack_is_valid_hl7_for_hl7apy() -> None:
    from hl7apy.parser import parse_message

    rej = _reject(_set_field("PV1", 2, "Z"))
    ack = build_ack(rej, "AE", ack_control_id="BRY-5", error=rej).decode()
    msg = parse_message(ack, find_groups=False)
    assert msg.msa.msa_1.value == "AE"
    assert msg.msa.msa_2.value == CONTROL_ID
    assert msg.err.err_3.err_3_1.value == "103"


# --------------------------------------------------------------------------- corpus


def _split_messages(data: bytes) -> list[bytes]:
    """Messages in a corpus file: a new one starts at every line beginning with MSH."""
    messages: list[list[bytes]] = []
    for line in re.split(rb"\r\n|\r|\n", data):
        if line.lstrip(b"\xef\xbb\xbf").startswith(b"MSH"):
            messages.append([line])
        elif messages:
            messages[-1].append(line)
    return [b"\r".join(m) for m in messages]


CORPUS_MESSAGES = [
    pytest.param(msg, id=f"{path.relative_to(CORPUS)}#{i}")
    for path in (sorted(CORPUS.glob("**/*.hl7")) if CORPUS.is_dir() else [])
    for i, msg in enumerate(_split_messages(path.read_bytes()), 1)
]


def _retarget(msg: bytes, pid3: bytes | None = None) -> bytes:
    """Make a corpus message claim to be a v2.5 ADT^A01 (and optionally carry a PNR)."""
    segs = msg.split(b"\r")
    f = segs[0].split(b"|")
    f += [b""] * (12 - len(f))
    f[1], f[8], f[11] = b"^~\\&", b"ADT^A01", b"2.5"
    segs[0] = b"|".join(f)
    for i, seg in enumerate(segs):
        if pid3 is not None and seg.startswith(b"PID|"):
            p = seg.split(b"|")
            p += [b""] * (4 - len(p))
            p[3] = pid3
            segs[i] = b"|".join(p)
    return b"\r".join(segs)


def _accept_or_precise(raw: bytes) -> Inbound | Hl7Rejection:
    try:
        return parse(raw)
    except Hl7Rejection as rej:
        assert re.fullmatch(r"[A-Z][A-Z0-9]{2}", rej.segment)
        assert rej.ack_code in ("AE", "AR")
        assert rej.hl7_error_code in (100, 101, 102, 103, 200, 201, 203), rej
        assert rej.text
        ack = build_ack(rej, rej.ack_code, ack_control_id="C1", error=rej)
        assert parse_ack(ack)[0] == rej.ack_code
        return rej


def test_corpus_is_there() -> None:
    assert len(CORPUS_MESSAGES) >= 140


@pytest.mark.parametrize("raw", CORPUS_MESSAGES)
def test_corpus_message(raw: bytes) -> None:
    """As sent: rejected precisely (US identifiers, other versions and types)."""
    result = _accept_or_precise(raw)
    assert isinstance(result, Hl7Rejection)
    if result.ack_code == "AE":
        assert result.location == "PID-3"


@pytest.mark.parametrize("raw", CORPUS_MESSAGES)
def test_corpus_message_as_a01(raw: bytes) -> None:
    """Claiming ADT^A01 v2.5, the US content reaches the mapping: AE naming the problem."""
    result = _accept_or_precise(_retarget(raw))
    assert isinstance(result, Hl7Rejection) and result.ack_code == "AE"
    result = _accept_or_precise(_retarget(raw, b"191212121212^^^^PNR"))
    if isinstance(result, Hl7Rejection):
        _assert_clean(result)


# --------------------------------------------------------------------------- fuzzing

_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from(list("|^~\\&\r\n\x0b\x1c")),
    max_size=40,
)


@st.composite
def mutated(draw: st.DrawFn, segments: list[str] | None = None) -> bytes:
    """A valid message (the full A01 by default), damaged in one to three ways."""
    segs = list(segments if segments is not None else BASE_SEGMENTS)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "field", "truncate", "insert"]))
        i = draw(st.integers(0, len(segs) - 1)) if segs else 0
        if op == "delete" and segs:
            del segs[i]
        elif op == "duplicate" and segs:
            segs.insert(i, segs[i])
        elif op == "swap" and len(segs) > 1:
            j = draw(st.integers(0, len(segs) - 1))
            segs[i], segs[j] = segs[j], segs[i]
        elif op == "field" and segs:
            parts = segs[i].split("|")
            k = draw(st.integers(1, max(1, len(parts) + 2)))
            parts += [""] * (k + 1 - len(parts))
            parts[k] = draw(_TEXT)
            segs[i] = "|".join(parts)
        elif op == "truncate" and segs:
            segs[i] = segs[i][: draw(st.integers(0, len(segs[i])))]
        elif op == "insert":
            segs.insert(i, draw(_TEXT))
    data = "\r".join(segs).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    return data


def _check_fuzzed(raw: bytes) -> None:
    try:
        parse(raw)
    except Hl7Rejection as rej:
        assert re.fullmatch(r"[A-Z][A-Z0-9]{2}", rej.segment), rej
        assert rej.hl7_error_code != 207, f"internal error: {rej}"
        assert rej.ack_code in ("AE", "AR")
        _assert_clean(rej)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_messages(raw: bytes) -> None:
    _check_fuzzed(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(0, len(BASE)))
def test_fuzz_random_bytes(noise: bytes, at: int) -> None:
    _check_fuzzed(noise)
    base = BASE.encode("utf-8")
    _check_fuzzed(base[:at] + noise + base[at:])


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["PID", "PV1", "PV2", "PD1", "ROL", "ZSC", "EVN", "MSH"]),
    st.integers(1, 45),
    _TEXT,
)
def test_fuzz_any_field(segment: str, field: int, value: str) -> None:
    _check_fuzzed(_set_field(segment, field, value))


def test_bare_segments_without_fields() -> None:
    assert _reject(_replace_segment("ZSC", "ZSC")).location == "ZSC-2"
    assert _reject(_replace_segment("PID", "PID")).location == "PID-3"


def test_ack_for_unsupported_charset_declares_what_it_uses() -> None:
    rej = _reject(_set_field("MSH", 18, "UNICODE UTF-16"))
    msh = build_ack(rej, "AR", ack_control_id="X", error=rej).decode().split("\r")[0]
    assert msh.endswith("|UNICODE UTF-8")


# --------------------------------------------------------------------------- bounded work


def _pid3_with(repetitions: int) -> bytes:
    """The A01 with PID-3 holding ``repetitions`` identifiers (the Swedish one first)."""
    extra = "~".join(f"X{i}^^^^MR" for i in range(repetitions - 1))
    return _set_field("PID", 3, f"{PNR}^^^^PNR~{extra}" if extra else f"{PNR}^^^^PNR")


def _timed(raw: bytes) -> tuple[float, Inbound | Hl7Rejection]:
    began = time.perf_counter()
    try:
        result: Inbound | Hl7Rejection = parse(raw)
    except Hl7Rejection as rej:
        result = rej
    return time.perf_counter() - began, result


def test_50000_repetitions_of_pid3_are_refused_in_bounded_time() -> None:
    # The quadratic parser took minutes here (4,000 repetitions: 2 s; 8,000: 9 s).
    seconds, result = _timed(_pid3_with(50_000))
    assert isinstance(result, Hl7Rejection)
    assert (result.ack_code, result.location, result.hl7_error_code) == ("AE", "PID-3", 102)
    assert "more than 100 repetitions" in result.text
    assert seconds < 5


def test_50000_repetitions_parse_in_bounded_time_without_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the cap lifted the parser itself must still be linear: every repetition is read.
    monkeypatch.setattr(hl7in, "MAX_REPETITIONS", 10**9)
    seconds, result = _timed(_pid3_with(50_000))
    assert isinstance(result, Inbound) and result.canonical.patient_ids[0].value == PNR
    assert seconds < 5


def test_too_many_segments_are_refused_naming_the_segment() -> None:
    rol = "ROL|9|AD|AT^Attending^HL70443|SE2321000016-P123^Läkare^Lena"
    seconds, result = _timed(_msg(*BASE_SEGMENTS, *[rol] * hl7in.MAX_SEGMENTS))
    assert isinstance(result, Hl7Rejection)
    assert (result.ack_code, result.segment, result.hl7_error_code) == ("AE", "ROL", 100)
    assert f"more than {hl7in.MAX_SEGMENTS} segments" in result.text
    assert seconds < 5


def test_a_megabyte_of_noise_after_msh_is_rejected_quickly() -> None:
    alphabet = b"|^~\\&\rA0 " * 29  # 261 bytes: any byte maps onto a delimiter-heavy mix
    noise = random.Random(9).randbytes(1 << 20).translate(alphabet[:256])
    for raw in (noise, BASE.encode()[:200] + noise, BASE.encode() + noise):
        seconds, result = _timed(raw)
        assert isinstance(result, Hl7Rejection) and result.hl7_error_code != 207
        assert seconds < 5


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([3, 5, 11, 13]), st.integers(1, 3 * hl7in.MAX_REPETITIONS))
def test_repetition_cap_names_the_field(field: int, repetitions: int) -> None:
    value = "~".join([_field_value("PID", field)] * repetitions)
    try:
        parse(_set_field("PID", field, value))
    except Hl7Rejection as rej:
        if repetitions > hl7in.MAX_REPETITIONS:
            assert (rej.location, rej.hl7_error_code) == (f"PID-{field}", 102)
        else:
            assert rej.hl7_error_code != 207 and "repetitions" not in rej.text
        return
    assert repetitions <= hl7in.MAX_REPETITIONS


def _field_value(segment: str, field: int) -> str:
    """The field as BASE has it (MSH aside)."""
    seg = next(s for s in BASE_SEGMENTS if s.startswith(segment + "|")).split("|")
    return seg[field] if field < len(seg) else ""


def test_care_parties_are_capped_and_counted_in_linear_time() -> None:
    rols = [f"ROL|{i}|AD|HEMTJANST^H^L|SE2120000829-H{i}^Unit" for i in range(4000)]
    seconds, result = _timed(_msg(*BASE_SEGMENTS, *rols))
    assert isinstance(result, Hl7Rejection) and seconds < 5
    assert (result.ack_code, result.segment, result.hl7_error_code) == ("AE", "ROL", 100)
    assert f"more than {hl7in.MAX_CARE_PARTIES} care parties" in result.text
    within = _msg(*BASE_SEGMENTS, *rols[: hl7in.MAX_CARE_PARTIES - 2], rols[0])
    parties = parse(within).canonical.care_parties
    assert len(parties) == hl7in.MAX_CARE_PARTIES and len(set(parties)) == len(parties)


def test_numbers_too_long_for_json_are_refused() -> None:
    # Found by fuzzing: an 88-digit dose passed the mapper and failed in intake's JSON.
    rxe = "RXE||N02BE01^Paracetamol^ATC|" + "1" * 16 + "||mg"
    assert _reject(_msg(*BASE_SEGMENTS, rxe)).location == "RXE-3"
    dg1 = "DG1|1||S72.0^Fraktur^ICD-10-SE|||F|||||||||" + "9" * 16
    assert _reject(_msg(*BASE_SEGMENTS, dg1)).location == "DG1-15"
    ok = parse(_msg(*BASE_SEGMENTS, rxe.replace("1" * 16, "1" * 15)))
    assert ok.canonical.medications[0].dose == "1" * 15
