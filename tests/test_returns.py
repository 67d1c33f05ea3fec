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
from tests.test_takecare_receipts import takecare as takecare  # noqa: F401 (fixture)

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
@given(
    text=st.text(max_size=300),
    name=st.text(min_size=1, max_size=60),
    phone=st.from_regex(r"[0-9 +-]{1,20}", fullmatch=True).filter(
        lambda p: any(c.isdigit() for c in p)
    ),
)
def test_any_fast_vardkontakt_reaches_the_ward_strictly_valid(
    text: str, name: str, phone: str
) -> None:
    body = {"contact": {"name": name, "title": "Läkare", "phone": phone}, "text": text}
    try:
        ret = returns.from_json("fast-vardkontakt", "n1", body, PERSON)
    except ReturnInvalid as exc:
        assert not name.strip() and exc.expression == "contact"  # the only way to be refused
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
        ("fast-vardkontakt", {"contact": {"name": "K", "title": "D"}}, "contact.phone"),
        ("fast-vardkontakt", {"text": "x"}, "contact"),
        ("kallelse-sip", {"sip_at": "i morgon"}, "sip_at"),
        ("kallelse-sip", {"sip_at": "2026-11-26T10:00:00"}, "sip_at"),
        ("avvikelse", {"category": "okänd", "text": "x"}, "category"),
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


# --- end to end: a real gateway process, the real broker, TakeCare as a real MLLP listener


def _fhir_return(event: LusEvent, notice_id: str, *resources: dict[str, Any]) -> dict[str, Any]:
    """A recipient system's message Bundle, written by hand (not by the gateway's code)."""
    comm_url = f"urn:uuid:{uuid.uuid4()}"
    comm: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "about": [{"identifier": {"system": NOTICE_SYSTEM, "value": notice_id}}],
    }
    entries = []
    for r in resources:
        url = f"urn:uuid:{uuid.uuid4()}"
        entries.append({"fullUrl": url, "resource": r})
        if r["resourceType"] == "PractitionerRole":
            comm.setdefault("payload", []).append({"contentReference": {"reference": url}})
        if r["resourceType"] == "Communication":
            comm.update(r)
            entries.pop()
    header_id = str(uuid.uuid4())
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{header_id}",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": header_id,
                    "eventCoding": {"system": LUS_EVENT_SYSTEM, "code": event.value},
                    "source": {"endpoint": "https://fhir.example.se/fhir"},
                    "focus": [{"reference": comm_url}],
                },
            },
            {"fullUrl": comm_url, "resource": comm},
            *entries,
        ],
    }


def _ward_returns(takecare: TakeCareListener, control_id: str) -> dict[str, dict[str, str]]:
    """What reached TakeCare about its message ``control_id``: per return kind (MEDDELANDE),
    the OBX values by code."""
    out: dict[str, dict[str, str]] = {}
    for m in takecare.oru():
        if str(m.segment("OBR")[2]) != control_id or "LUSSVAR" not in str(m.segment("OBR")[4]):
            continue
        obx = {str(s[3][0][0]): str(s[5]) for s in m.segments("OBX")}
        out[obx["MEDDELANDE"]] = obx
    return out


def _notice(gw: Any, org: str, event: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        r = httpx.get(f"{gw.base_url}/api/v1/inbox", headers=gw.token(org))
        return next((n for n in r.json() if n["event"] == event), None)

    return wait_for(found, what=f"{event} in the inbox of {org}")


def test_every_return_kind_end_to_end(
    tmp_path: Path, database_url: str, broker: Broker, takecare: TakeCareListener
) -> None:
    gw = reporting_gateway(tmp_path, database_url, broker, takecare)
    gw.start()
    try:
        base = gw.base_url
        assert msa(send(gw, admission("TC-RET", now_sthlm(), pnr=personnummer(950))))[1] == "AA"
        at_bistand = _notice(gw, BISTAND, "inskrivningsmeddelande")
        at_listed = _notice(gw, LISTED, "inskrivningsmeddelande")
        at_home = _notice(gw, HOME_CARE, "inskrivningsmeddelande")

        def inbox_return(org: str, notice: str, kind: str, body: Any, **who: str) -> httpx.Response:
            return httpx.post(
                f"{base}/api/v1/inbox/{notice}/returns/{kind}",
                json=body,
                headers=gw.token(org, **who),
            )

        def fhir_return(org: str, bundle: dict[str, Any]) -> httpx.Response:
            return httpx.post(
                f"{base}/fhir/$process-message",
                json=bundle,
                headers={
                    **gw.token(org, role="integration"),
                    "Content-Type": "application/fhir+json",
                },
            )

        # Kvittens with needs, from the inbox: the person is the token's, never the body's.
        r = inbox_return(
            BISTAND, at_bistand["id"], "kvittens",
            {"needs": ["hemtjanst", "trygghetslarm"], "text": "Larm finns", "by": "Någon Annan"},
            name="Anna Svensson", title="Biståndshandläggare",
        )  # fmt: skip
        assert r.status_code == 201, r.text
        kvittens_id = r.json()["message_id"]
        acked = httpx.get(f"{base}/api/v1/inbox/{at_bistand['id']}", headers=gw.token(BISTAND))
        assert acked.json()["state"] == "acknowledged"
        assert _notice(gw, LISTED, "kvittens")["for_information"] is True

        # Fast vårdkontakt, from primary care's own system over FHIR.
        role = {
            "resourceType": "PractitionerRole",
            "code": [{"text": "Distriktssköterska"}],
            "telecom": [{"system": "phone", "value": "08-123 45 67"}],
            "practitioner": {"display": "Karin Lind"},
        }
        practitioner = {"resourceType": "Practitioner", "name": [{"text": "Karin Lind"}]}
        bundle = _fhir_return(LusEvent.FAST_VARDKONTAKT, at_listed["id"], practitioner, role)
        role_url = bundle["entry"][2]["fullUrl"]
        bundle["entry"][3]["resource"]["practitioner"] = {"reference": role_url}
        r = fhir_return(LISTED, bundle)
        assert r.status_code == 200, r.text
        assert r.json()["entry"][0]["resource"]["response"]["code"] == "ok"
        assert (
            r.json()["entry"][0]["resource"]["response"]["identifier"]
            == (bundle["entry"][0]["resource"]["id"])
        )
        (report,) = validate([r.json()])  # the gateway's answer, as another reader sees it
        assert report.errors == [], report.text()
        assert fhir_return(LISTED, bundle).status_code == 200  # the same again: nothing new
        fvk = _notice(gw, BISTAND, "fast-vardkontakt")
        assert fvk["for_information"] is False
        assert _notice(gw, HOME_CARE, "fast-vardkontakt")["for_information"] is True

        # SIP: the municipality calls one itself; declined; the plan.
        sip = {"sip_at": "2026-11-26T10:00:00+01:00", "text": "Möte på avdelningen"}
        assert inbox_return(BISTAND, at_bistand["id"], "kallelse-sip", sip).status_code == 201
        assert _notice(gw, HOME_CARE, "kallelse-sip")["sender_hsa_id"] == BISTAND
        body = {"text": "Patienten avböjer SIP"}
        assert inbox_return(BISTAND, at_bistand["id"], "sip-avbojd", body).status_code == 201
        body = {"text": "Hemtjänst 4 ggr/dag"}
        assert inbox_return(BISTAND, at_bistand["id"], "sip-plan", body).status_code == 201

        # A request for information reaches the ward's inbox too; the ward answers it there,
        # and the answer reaches the party that asked. Another party may answer by its id.
        body = {"text": "Vilka hjälpmedel behövs?"}
        r = inbox_return(HOME_CARE, at_home["id"], "informationsbegaran", body)
        assert r.status_code == 201
        request_id = r.json()["message_id"]
        at_ward = _notice(gw, HOSPITAL, "informationsbegaran")
        assert at_ward["role"] == "ward" and at_ward["sender_hsa_id"] == HOME_CARE
        body = {"text": "Rollator"}
        assert inbox_return(HOSPITAL, at_ward["id"], "informationssvar", body).status_code == 201
        answer = _notice(gw, HOME_CARE, "informationssvar")
        assert answer["role"] == "asker" and answer["sender_hsa_id"] == HOSPITAL
        body = {"answers": request_id, "text": "Och duschpall"}
        assert inbox_return(BISTAND, at_bistand["id"], "informationssvar", body).status_code == 201
        r = inbox_return(BISTAND, at_bistand["id"], "informationssvar", {"text": "Vad?"})
        assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["answers"]

        # Services started.
        body = {"needs": ["hemtjanst"], "text": "Start 07:00"}
        assert inbox_return(HOME_CARE, at_home["id"], "insatser-startade", body).status_code == 201
        _notice(gw, BISTAND, "insatser-startade")

        # A deviation over FHIR, with its category; the ward answers it to the end.
        category = {
            "resourceType": "Communication",
            "reasonCode": [
                {"coding": [{"system": returns.DEVIATION_CATEGORY_SYSTEM, "code": "kommunikation"}]}
            ],
            "payload": [{"contentString": "Fel datum i meddelandet"}],
        }
        r = fhir_return(HOME_CARE, _fhir_return(LusEvent.AVVIKELSE, at_home["id"], category))
        assert r.status_code == 200, r.text
        raised = wait_for(
            lambda: [
                d
                for d in httpx.get(f"{base}/api/v1/deviations", headers=gw.token(HOSPITAL)).json()
                if d["kind"] == "reported"
            ],
            what="the reported deviation at the ward",
        )
        assert "Brister i kommunikation" in raised[0]["summary"]
        assert "Fel datum" not in raised[0]["summary"]  # the party's text stays encrypted
        answered = httpx.post(
            f"{base}/api/v1/deviations/{raised[0]['id']}/answer",
            json={"text": "Rättat"},
            headers=gw.token(HOSPITAL),
        )
        assert answered.json()["status"] == "answered"

        # Bad inputs: another organisation's notice, a wrong need, a bad FHIR Bundle.
        r = inbox_return(NIGHT, at_bistand["id"], "kvittens", {"needs": ["hemtjanst"]})
        assert r.status_code == 404
        r = inbox_return(BISTAND, at_bistand["id"], "kvittens", {"needs": ["tolvan"]})
        assert r.status_code == 422 and r.json()["issue"][0]["expression"] == ["needs[0]"]
        r = inbox_return(BISTAND, at_bistand["id"], "utskrivningsklar", {"text": "x"})
        assert r.status_code == 422
        no_phone = _fhir_return(
            LusEvent.FAST_VARDKONTAKT, at_listed["id"], practitioner, {**role, "telecom": []}
        )
        no_phone["entry"][3]["resource"]["practitioner"] = {
            "reference": no_phone["entry"][2]["fullUrl"]
        }
        r = fhir_return(LISTED, no_phone)
        assert r.status_code == 400 and "telecom" in r.json()["issue"][0]["expression"][0]
        r = fhir_return(BISTAND, _fhir_return(LusEvent.SIP_PLAN, at_listed["id"], category))
        assert r.status_code == 404  # the notice went to another organisation

        # Everything went back to the ward in TakeCare, strictly valid, filed on its message.
        kinds = {e.display for e in returns.rules().to_ward}
        wait_for(
            lambda: set(_ward_returns(takecare, "TC-RET")) == kinds,
            timeout=30,
            what="every return kind at TakeCare",
        )
        ward = _ward_returns(takecare, "TC-RET")
        assert ward["Kvittens"]["UTFORDAV"] == "Anna Svensson (Biståndshandläggare)"
        assert ward["Kvittens"]["BEHOV"] in {"Hemtjänst", "Trygghetslarm"}
        assert ward["Fast vårdkontakt"]["FVKTELEFON"] == "08-123 45 67"
        assert ward["Kallelse till SIP"]["SIPTID"] == "2026-11-26 10:00"
        assert ward["Avvikelse"]["KATEGORI"].startswith("Brister i kommunikation")
        for m in takecare.oru():
            assert strict_problems(str(m)) == []
        assert len([m for m in takecare.oru() if "Fast vårdkontakt" in str(m)]) == 1
        assert kvittens_id
    finally:
        gw.stop()


def test_the_return_rules_are_consistent_data(tmp_path: Path) -> None:
    """Every receipt clock names a rule of the deadlines; an event in both files is refused."""
    from gateway.pipeline.deadlines import DEADLINES_FILE, Deadlines
    from gateway.pipeline.routing import RoutingRules
    from mappings import MAPPINGS_DIR

    deadlines = Deadlines.load(DEADLINES_FILE)
    for event, name in returns.rules().receipts.items():
        assert name in deadlines.names, event
        assert event not in deadlines.receipts  # one place decides each event's clock
    lus = MAPPINGS_DIR / "routing" / "lus.toml"
    both = RoutingRules.load(lus, returns.RETURNS_FILE)
    assert "bistand" in both.rule(LusEvent.FAST_VARDKONTAKT).receivers
    assert "bistand" in both.rule(LusEvent.KALLELSE_SIP).receivers  # lus.toml's rule
    twice = tmp_path / "twice.toml"
    twice.write_text('[kallelse-sip]\nreceivers = ["bistand"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="already"):
        RoutingRules.load(lus, twice)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["about", "payload", "reasonCode", "sender", "inResponseTo"]),
    value=_JSON,
    event=st.sampled_from(sorted(returns.rules().accepted)),
)
def test_any_fhir_return_is_taken_or_refused_by_element(
    field: str, value: Any, event: LusEvent
) -> None:
    """What $process-message does with any value in the Communication: a ReturnMessage, or
    a refusal naming where (the API answers 400 for a structural error too, never 500)."""
    original = _original()
    ret = EXAMPLES[[e.event for e in EXAMPLES].index(event)]
    bundle = build_bundle(original, original["id"], ret, "m", BISTAND, "", AT)
    comm = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Communication"
    )
    comm[field] = value
    header = bundle["entry"][0]["resource"]
    try:
        returns.from_fhir(bundle, header)
    except ReturnInvalid as exc:
        assert exc.expression.startswith("Bundle")
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        pass  # the API's 400 (routes_fhir_messaging._return_message)
