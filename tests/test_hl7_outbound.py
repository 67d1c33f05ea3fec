"""Outbound HL7 v2 read by an independent reader: hl7apy's strict parser and validator.

Every golden message of mappings/hl7v2/golden/ is parsed with hl7apy at STRICT level in the
version its MSH-12 declares (structure, cardinality, data types, groups), validated (table
values; a value outside an HL7 table is a failure unless it is one of the local codes
listed below), and every field is checked against the version's length
(mappings/hl7v2/lengths.toml: hl7apy 1.3.5 carries no lengths). The checker is shown to
fail on wrong messages, and a property test renders any Bundle content through it.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import tomllib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7v2.render import LENGTHS, cut, render, stable_control_id
from adapters.takecare.ack import escape
from gateway.clock import STOCKHOLM
from gateway.model.bundle import Attachment, Document, to_bundle
from gateway.model.events import LusEvent
from gateway.model.identifiers import parse_identity_number
from mappings import MAPPINGS_DIR
from tests.inprocess import HOME_CARE, canonical
from tests.support import personnummer

GOLDEN = MAPPINGS_DIR / "hl7v2" / "golden"
MADE = datetime(2026, 11, 23, 8, 31, 5, tzinfo=UTC)
_LENGTHS = tomllib.loads(LENGTHS.read_text(encoding="utf-8"))
# Local values in tables that HL7 leaves open to them: the Swedish identifier types in 0203
# (user-extensible) and local coding systems in 0396 ("L" or "99zzz").
_LOCAL = {"HL70203": re.compile(r"PNR|SNR|RNR"), "HL70396": re.compile(r"L|99[A-Z0-9]{1,3}")}
_WARNING = re.compile(r"Value (.*) not in table (HL7\d+) in element")


def strict_problems(er7: str) -> list[str]:
    """What a strict reader objects to in ``er7``; [] when it takes the message."""
    version = er7.split("\r", 1)[0].split("|")[11]
    try:
        msg = parse_message(
            _ed_data_shortened(er7), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
        )
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.txt"
            msg.validate(report_file=str(report))
            lines = report.read_text().splitlines() if report.exists() else []
    except HL7apyException as exc:
        return [f"hl7apy: {type(exc).__name__}: {exc}"]
    problems = []
    for line in lines:
        found = _WARNING.search(line)
        if found and (rule := _LOCAL.get(found[2])) and rule.fullmatch(found[1]):
            continue
        if line.strip():
            problems.append(line)
    limits = _LENGTHS.get(version)
    if limits is None:
        return [*problems, f"no field lengths known for version {version}"]
    for segment in er7.rstrip("\r").split("\r"):
        name, *fields = segment.split("|")
        offset = 2 if name == "MSH" else 1  # MSH-1 is the separator itself
        for n, value in enumerate(fields, offset):
            if not value:
                continue
            limit = limits.get(name, {}).get(str(n))
            ed = name == "OBX" and n == 5 and fields[1] == "ED"
            if limit is None:
                problems.append(f"{name}-{n}: no length known")
            elif len(value) > limit and not ed:
                problems.append(f"{name}-{n}: {len(value)} > {limit}")
    return problems


def _ed_data_shortened(er7: str) -> str:
    """hl7apy reads OBX-5 (Varies) as ST whatever OBX-2 says, so an ED's data (ED.5, TX up to
    65,536 in v2.5) longer than ST's 199 is refused as too long. The strict reader gets the data
    cut to 199; the length check below reads the field whole (mappings/hl7v2/lengths.toml)."""
    segments = []
    for segment in er7.split("\r"):
        fields = segment.split("|")
        if fields[0] == "OBX" and len(fields) > 5 and fields[2] == "ED":
            parts = fields[5].split("^")
            if len(parts) > 4:
                parts[4] = parts[4][:199]
            fields[5] = "^".join(parts)
        segments.append("|".join(fields))
    return "\r".join(segments)


def golden(case: str) -> tuple[dict, str]:
    given_ = json.loads((GOLDEN / f"{case}.json").read_text(encoding="utf-8"))
    made = datetime.fromisoformat(given_["made_at"])
    er7 = render(given_["bundle"], given_["dedup_key"], given_["recipient_hsa_id"], made_at=made)
    return given_, er7


CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))


@pytest.mark.parametrize("case", CASES)
def test_golden_message_passes_strict_validation(case: str) -> None:
    _, er7 = golden(case)
    assert er7 == (GOLDEN / f"{case}.hl7").read_bytes().decode("utf-8")
    assert strict_problems(er7) == []


def test_every_rendered_event_has_a_golden_case() -> None:
    kinds = {str(hl7.parse(golden(c)[1])["MSH.F9.R1.C2"]) for c in CASES}
    assert {"T02", "A16", "A25", "A40"} <= kinds


def _swap(er7: str, segment: str, field: int, value: str) -> str:
    out = []
    for seg in er7.rstrip("\r").split("\r"):
        parts = seg.split("|")
        if parts[0] == segment:
            n = field - 1 if segment == "MSH" else field
            parts += [""] * (n + 1 - len(parts))
            parts[n] = value
        out.append("|".join(parts))
    return "\r".join(out) + "\r"


@pytest.mark.parametrize(
    ("segment", "field", "value", "words"),
    [
        ("TXA", 2, "DS^Utskrivning^LUS", "TXA_2"),
        ("TXA", 2, "ZZ", "HL70270"),
        ("MSH", 10, "6d1f4a52-0000-4e8e-9a57-000000000039", "MSH-10"),
        ("TXA", 12, "D-" + "9" * 40, "TXA-12"),
        ("PID", 8, "X", "HL70001"),
        ("PV1", 99, "extra", "unknown Element"),
    ],
)
def test_the_checker_reports_what_is_wrong(
    segment: str, field: int, value: str, words: str
) -> None:
    _, er7 = golden("utskrivning_documents_samordningsnummer")
    problems = strict_problems(_swap(er7, segment, field, value))
    assert problems and any(words in p for p in problems), problems


# --- what the receiver needs ---------------------------------------------------------------


def test_a16_carries_ready_time_and_expected_discharge() -> None:
    _, er7 = golden("utskrivningsklar_a16_expected_discharge")
    msg = hl7.parse(er7)
    assert str(msg.segment("MSH")[9]) == "ADT^A16^ADT_A16"
    assert str(msg["EVN.F6"]) == "20261123084500+0100"  # the physician's decision
    assert str(msg["PV2.F9"]) == "20261125110000+0100"  # the care plan's planned end
    assert str(msg["MSH.F7"]) == "20261123093105+0100"  # when the message was made


def test_a40_carries_every_prior_identifier() -> None:
    _, er7 = golden("patientsammanslagning_a40_prior_ids")
    msg = hl7.parse(er7)
    assert str(msg.segment("MSH")[9]) == "ADT^A40^ADT_A39"
    mrg = msg.segment("MRG")[1]
    assert [str(r[0]) for r in mrg] == [
        parse_identity_number(personnummer(n)).value for n in (5, 6)
    ]
    assert [str(r[4]) for r in mrg] == ["PNR", "PNR"]
    assert str(msg["PID.F3.R1.C1"]) == parse_identity_number(personnummer(4)).value


def test_mdm_embeds_the_pdf_and_links_what_it_cannot_embed() -> None:
    given_, er7 = golden("utskrivning_pdf_embedded_long_docnumber")
    ed = [s for s in hl7.parse(er7).segments("OBX") if str(s[2]) == "ED"]
    assert len(ed) == 1
    data = str(ed[0][5][0][4])
    assert base64.b64decode(data).startswith(b"%PDF")
    assert str(ed[0][5][0][1]) == "AP" and str(ed[0][5][0][2]) == "PDF"
    txa12 = str(hl7.parse(er7)["TXA.F12"])
    assert txa12 == stable_control_id("D-4711-Läkemedelslista-2026-11-23-version-3")
    _, linked = golden("utskrivning_documents_samordningsnummer")
    rp = [s for s in hl7.parse(linked).segments("OBX") if str(s[2]) == "RP"]
    assert [str(s[5][0][0]) for s in rp] == ["https://takecare.example.se/dokument/D-77"]


def test_a_document_too_big_to_embed_goes_as_its_link() -> None:
    big = base64.b64encode(b"%PDF" + b"x" * 80_000).decode()
    for url, kind in (("https://tc.example.se/d/1", "RP"), ("", "TX")):
        doc = Document(
            "UTSKRIVNING",
            "Stor bilaga",
            (Attachment("application/pdf", data=big, url=url),),
        )
        msg = replace(canonical(2, event=LusEvent.UTSKRIVNINGSMEDDELANDE), documents=[doc])
        er7 = render(to_bundle(msg, "m"), "k", HOME_CARE, made_at=MADE)
        assert strict_problems(er7) == []
        last = list(hl7.parse(er7).segments("OBX"))[-1]
        assert str(last[2]) == kind


def test_msh10_is_stable_per_delivery_and_within_20() -> None:
    assert stable_control_id("delivery-1") == stable_control_id("delivery-1")
    assert stable_control_id("delivery-1") != stable_control_id("delivery-2")
    assert re.fullmatch(r"[A-Z2-7]{20}", stable_control_id("x" * 500))


def test_msh7_is_when_the_message_was_made(fixed_clock: object) -> None:
    b = to_bundle(canonical(1, event=LusEvent.PLANERINGSUNDERLAG), "m")
    msg = hl7.parse(render(b, "k", HOME_CARE))
    made = datetime(2026, 11, 23, 8, 0, tzinfo=UTC).astimezone(STOCKHOLM)
    assert str(msg["MSH.F7"]) == made.strftime("%Y%m%d%H%M%S%z")
    assert str(msg["MSH.F7"]) != str(msg["EVN.F2"])  # not the event's time


@given(text=st.text(max_size=80) | st.text("|^~\\&ab", max_size=80), limit=st.integers(0, 90))
def test_a_cut_field_is_a_prefix_and_never_splits_an_escape(text: str, limit: int) -> None:
    field = cut(escape(text), limit)
    assert len(field) <= limit and field.count("\\") % 2 == 0
    assert text.startswith(hl7.parse("MSH|^~\\&|" + field).unescape(field))


# --- any content ---------------------------------------------------------------------------

_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x1c\x0b")
    | st.sampled_from("|^~\\&\n\r"),
    max_size=400,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 4999),
    event=st.sampled_from(list(LusEvent)),
    note=_text,
    family=_text,
    given_name=_text,
    encounter_id=_text,
    doc_id=_text,
    title=_text,
    ward=_text,
    key=st.text(min_size=1, max_size=80),
)
def test_any_content_renders_to_a_strictly_valid_message(
    n: int,
    event: LusEvent,
    note: str,
    family: str,
    given_name: str,
    encounter_id: str,
    doc_id: str,
    title: str,
    ward: str,
    key: str,
) -> None:
    """Any texts, and a ward code as a feed sends it (a local code of any length)."""
    at = datetime(2026, 11, 23, 9, 30, tzinfo=STOCKHOLM)
    doc = Document(
        "UTSKRIVNING",
        title,
        (
            Attachment("text/plain", data=base64.b64encode(note.encode()).decode()),
            Attachment("application/pdf", url=f"https://tc.example.se/{title}"),
            Attachment("application/pdf", data=base64.b64encode(note.encode()).decode()),
        ),
        identifier=doc_id,
    )
    msg = replace(
        canonical(n, event=event),
        note=note,
        family=family,
        given=given_name,
        encounter_id=encounter_id,
        documents=[doc],
        ready_at=at,
        expected_discharge=at,
        replaces_ids=[parse_identity_number(personnummer((n + 1) % 5000))],
        ward_hsa_id=ward,
    )
    er7 = render(to_bundle(msg, "m"), key, HOME_CARE, made_at=MADE)
    assert strict_problems(er7) == []
    parsed = hl7.parse(er7)
    assert len(parsed) == len(er7.rstrip("\r").split("\r"))  # nothing split a segment
    assert str(parsed["MSH.F10"]) == stable_control_id(key)
