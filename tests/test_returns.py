"""What comes back (issue 11): the parties' return messages, in through the inbox API and
FHIR ``$process-message``, routed to the parties that must know and back to the ward in
TakeCare over MLLP (decision 0018)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.takecare.receipts import build_return_oru
from gateway.clock import STOCKHOLM
from gateway.demo import HOME_CARE, HOSPITAL, admission
from gateway.model.bundle import CareParty, read_bundle, to_bundle
from gateway.model.events import LUS_EVENT_SYSTEM, LusEvent
from gateway.pipeline import returns
from gateway.pipeline.ledger import Actor
from gateway.pipeline.returns import (
    NOTICE_SYSTEM,
    Contact,
    ReturnInvalid,
    ReturnMessage,
    build_bundle,
)
from tests.inprocess import canonical
from tests.services.fhir_validator import validate
from tests.support import Broker, now_sthlm, personnummer, wait_for
from tests.test_e2e_path import msa, send
from tests.test_hl7_outbound import strict_problems
from tests.test_takecare_receipts import TakeCareListener, reporting_gateway

LISTED = "SE2321000016-V010"
BISTAND = "SE2120001637-B020"
NIGHT = "SE5561234567-HT02"
AT = datetime(2026, 11, 23, 10, 0, tzinfo=STOCKHOLM)
PERSON = Actor("Anna Svensson", "Sjuksköterska", BISTAND)

EXAMPLES = [
    ReturnMessage(
        LusEvent.KVITTENS, "n1", "Hemtjänst morgon", ("hemtjanst", "trygghetslarm"), person=PERSON
    ),  # fmt: skip
    ReturnMessage(
        LusEvent.FAST_VARDKONTAKT,
        "n1",
        contact=Contact("Karin Lind", "Distriktssköterska", "08-123 45 67"),
    ),  # fmt: skip
    ReturnMessage(LusEvent.KALLELSE_SIP, "n1", "På avdelningen", sip_at=AT, person=PERSON),
    ReturnMessage(LusEvent.SIP_AVBOJD, "n1", "Patienten avböjer"),
    ReturnMessage(LusEvent.SIP_PLAN, "n1", "Planen: hemtjänst 4 ggr/dag"),
    ReturnMessage(LusEvent.INFORMATIONSBEGARAN, "n1", "Vilka hjälpmedel behövs?"),
    ReturnMessage(LusEvent.INFORMATIONSSVAR, "n1", "Rollator", answers=str(uuid.uuid4())),
    ReturnMessage(LusEvent.AVVIKELSE, "n1", "Ingen kallelse", category="sip-ej-genomford"),
    ReturnMessage(LusEvent.INSATSER_STARTADE, "n1", "Start 07:00", ("hemtjanst",)),
]


def _original() -> dict[str, Any]:
    msg = canonical(
        parties=[
            CareParty("bistand", BISTAND, "Biståndsenheten"),
            CareParty("hemtjanst", HOME_CARE, "Omsorgshuset"),
        ]
    )
    return to_bundle(msg, str(uuid.uuid4()))


def test_every_return_bundle_passes_the_independent_validator() -> None:
    original = _original()
    bundles = [
        build_bundle(original, original["id"], r, str(uuid.uuid4()), BISTAND, "", AT)
        for r in EXAMPLES
    ]
    for report, ret in zip(validate(bundles), EXAMPLES, strict=True):
        assert report.errors == [], f"{ret.event}: {report.text()}"
    for bundle, ret in zip(bundles, EXAMPLES, strict=True):
        view = read_bundle(bundle)
        assert view.event is ret.event and view.sender_hsa_id == BISTAND
        assert returns.is_return(bundle) and returns.answered_message(bundle) == original["id"]
        assert not returns.is_return(original)


def test_what_a_party_sends_over_fhir_reads_back_the_same() -> None:
    """The stored Bundle is also the wire format a recipient system sends."""
    original = _original()
    for ret in EXAMPLES:
        bundle = build_bundle(original, original["id"], ret, str(uuid.uuid4()), BISTAND, "", AT)
        header = bundle["entry"][0]["resource"]
        assert returns.is_return_request(header)
        back = returns.from_fhir(bundle, header)
        assert back.event is ret.event and back.notice_id == "n1"
        assert (back.needs, back.contact, back.sip_at, back.category, back.answers) == (
            ret.needs, ret.contact, ret.sip_at, ret.category, ret.answers,
        )  # fmt: skip
        assert back.text == ret.text


def test_every_return_goes_to_the_ward_as_a_strictly_valid_oru() -> None:
    original = _original()
    for ret in EXAMPLES:
        bundle = build_bundle(original, original["id"], ret, str(uuid.uuid4()), BISTAND, "", AT)
        oru = build_return_oru("N" * 20, "TAKECARE|" + HOSPITAL, "TC-1", original, bundle,
                               (BISTAND, "Biståndsenheten"))  # fmt: skip
        text = oru.decode()
        assert strict_problems(text) == [], (ret.event, strict_problems(text))
        assert "|TC-1||LUSSVAR^" in text and ret.event.display in text
    kvittens = build_bundle(original, original["id"], EXAMPLES[0], "m", BISTAND, "", AT)
    text = build_return_oru("N1", "TAKECARE|H", "TC-1", original, kvittens, (BISTAND, "B")).decode()
    assert "BEHOV^Behov/insats^L||Hemtjänst" in text and "Anna Svensson (Sjuksköterska)" in text


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300), name=st.text(min_size=1, max_size=60),
       phone=st.from_regex(r"[0-9 +-]{1,20}", fullmatch=True).filter(lambda p: any(c.isdigit() for c in p)))  # fmt: skip
def test_any_fast_vardkontakt_reaches_the_ward_strictly_valid(
    text: str, name: str, phone: str
) -> None:
    body = {"contact": {"name": name, "title": "Läkare", "phone": phone}, "text": text}
    try:
        ret = returns.from_json("fast-vardkontakt", "n1", body, PERSON)
    except ReturnInvalid as exc:
        assert text not in exc.text or not text.strip() or text in ("contact",)
        return
    original = _original()
    bundle = build_bundle(original, original["id"], ret, "m", BISTAND, "", AT)
    oru = build_return_oru("N1", "TAKECARE|H", "TC-1", original, bundle, (BISTAND, "B"))
    assert strict_problems(oru.decode()) == []


@pytest.mark.parametrize(
    ("kind", "body", "where"),
    [
        ("kvittens", {"needs": ["flygande-matta"]}, "needs[0]"),
        ("kvittens", {}, "needs"),
        ("fast-vardkontakt", {"contact": {"name": "K", "title": "Dsk", "phone": ""}}, "contact.phone"),
        ("fast-vardkontakt", {"text": "x"}, "contact"),
        ("kallelse-sip", {"sip_at": "i morgon"}, "sip_at"),
        ("kallelse-sip", {"sip_at": "2026-11-26T10:00:00"}, "sip_at"),
        ("avvikelse", {"category": "okänd", "text": "x"}, "category"),
        ("informationssvar", {"text": "x"}, "answers"),
        ("informationsbegaran", {}, "text"),
        ("kvittens", {"needs": "hemtjanst"}, "needs"),
        ("kvittens", {"text": 17}, "text"),
    ],
)  # fmt: skip
def test_bad_input_names_the_element_and_never_echoes_it(
    kind: str, body: dict[str, Any], where: str
) -> None:
    with pytest.raises(ReturnInvalid) as caught:
        returns.from_json(kind, "n1", body, PERSON)
    assert caught.value.expression == where
    for value in json.dumps(body, ensure_ascii=False).split('"'):
        if len(value) > 3 and value not in ("needs", "text", "contact", "phone", "title", "name"):
            assert value not in caught.value.text
