"""The FHIR messaging and HL7 v2/MLLP channels against real receivers on loopback sockets,
the outbound HL7 v2 rendering (golden cases, properties), and the gateway's
``POST /fhir/$process-message`` for receipts that come later (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from adapters.fhir.channel import FhirChannelSettings, FhirMessagingChannel
from adapters.hl7v2.channel import Hl7v2ChannelSettings, Hl7v2MllpChannel
from adapters.hl7v2.render import render, stable_control_id
from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.model.bundle import to_bundle
from gateway.model.events import LusEvent
from gateway.model.identifiers import HSA_SYSTEM, parse_identity_number
from gateway.pipeline.channels import (
    ChannelRegistry,
    ChannelRejected,
    ChannelUnavailable,
    DeliveryContext,
    Outcome,
)
from gateway.pipeline.ledger import State
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts
from mappings import MAPPINGS_DIR
from tests.inprocess import HOME_CARE, KEYER, Pipeline, canonical
from tests.standins import FhirReceiver, MllpReceiver, response_bundle
from tests.support import personnummer
from tests.test_hl7_outbound import strict_problems

GOLDEN = MAPPINGS_DIR / "hl7v2" / "golden"
PNR = personnummer(1)
NOTE = "Rollator | inomhus ^ trappor ~ hiss \\ dusch & bad\nNattpatrull 22:00\r\nKlart."
FAST = 1.0  # seconds: the channels' timeout in these tests


def bundle(n: int = 1, **changes: Any) -> dict[str, Any]:
    msg = replace(canonical(n, event=LusEvent.PLANERINGSUNDERLAG), note=NOTE, **changes)
    return to_bundle(msg, f"message-{n}")


def ctx(address: str, attempt: int = 1, key: str = "delivery-1", **changes: Any) -> DeliveryContext:
    return DeliveryContext(
        delivery_id=key,
        message_id="message-1",
        recipient_hsa_id=HOME_CARE,
        bundle=bundle(**changes),
        address=address,
        attempt=attempt,
        dedup_key=key,
    )


@pytest.fixture(scope="module")
def fhir_rx() -> Iterator[FhirReceiver]:
    with FhirReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def mllp_rx() -> Iterator[MllpReceiver]:
    with MllpReceiver() as rx:
        yield rx


@pytest.fixture
def fhir(fhir_rx: FhirReceiver) -> Iterator[FhirReceiver]:
    fhir_rx.reset()
    if not fhir_rx.running:
        fhir_rx.start()
    yield fhir_rx


@pytest.fixture
def mllp(mllp_rx: MllpReceiver) -> Iterator[MllpReceiver]:
    mllp_rx.reset()
    if not mllp_rx.running:
        mllp_rx.start()
    yield mllp_rx


def fhir_channel() -> FhirMessagingChannel:
    return FhirMessagingChannel(FhirChannelSettings(timeout_seconds=FAST))


def hl7_channel() -> Hl7v2MllpChannel:
    return Hl7v2MllpChannel(Hl7v2ChannelSettings(timeout_seconds=FAST))


def test_both_channels_are_found_through_the_entry_points() -> None:
    registry = ChannelRegistry.discover()
    for name in ("fhir", "hl7v2"):
        channel = registry.get(name)
        assert channel is not None and channel.name == name
        assert channel.protected_identity and channel.application_receipts
    assert registry.best(["fax", "hl7v2", "inbox"], protected_identity=True) == "hl7v2"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FhirChannelSettings().timeout_seconds == 10 == Hl7v2ChannelSettings().timeout_seconds
    monkeypatch.setenv("BRYGGA_FHIR_CHANNEL_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("BRYGGA_HL7V2_CHANNEL_TIMEOUT_SECONDS", "4")
    assert FhirChannelSettings().timeout_seconds == 2.5
    assert Hl7v2ChannelSettings().timeout_seconds == 4


# --- FHIR messaging ----------------------------------------------------------------------


async def test_fhir_ok_is_received_and_the_bundle_is_addressed(fhir: FhirReceiver) -> None:
    outcome = await fhir_channel().deliver(ctx(fhir.url))
    assert outcome.state is State.RECEIVED and "ok" in outcome.detail
    sent = fhir.received[0]
    header = sent["entry"][0]["resource"]
    assert sent["id"] == header["id"] == "delivery-1"
    assert header["destination"] == [
        {
            "endpoint": fhir.url,
            "receiver": {"identifier": {"system": HSA_SYSTEM, "value": HOME_CARE}},
        }
    ]
    # the rest is the canonical Bundle, untouched
    assert sent["entry"][1:] == bundle()["entry"][1:]


def endpoints(kind: str, fhir: FhirReceiver, mllp: MllpReceiver) -> tuple[Any, Any, str]:
    """(receiver, channel, address) of one kind."""
    if kind == "fhir":
        return fhir, fhir_channel(), fhir.url
    return mllp, hl7_channel(), mllp.address


@pytest.mark.parametrize("kind", ["fhir", "hl7v2"])
async def test_resends_keep_the_dedup_key_and_are_shown_once(
    kind: str, fhir: FhirReceiver, mllp: MllpReceiver
) -> None:
    rx, channel, address = endpoints(kind, fhir, mllp)
    rx.down = True
    with pytest.raises(ChannelUnavailable):
        await channel.deliver(ctx(address, attempt=1))
    rx.down = False
    for attempt in (2, 3):
        assert (await channel.deliver(ctx(address, attempt=attempt))).state is State.RECEIVED
    shown = "delivery-1" if kind == "fhir" else stable_control_id("delivery-1")
    assert len(rx.received) == 2 and list(rx.shown) == [shown]
    if kind == "fhir":
        assert rx.received[0] == rx.received[1]  # the same message, dedup key and all
    else:  # the same message and MSH-10; MSH-7 is when each was made
        first, second = (hl7.parse(m) for m in rx.received)
        first.segment("MSH")[7] = second.segment("MSH")[7] = ""
        assert str(first) == str(second)


@pytest.mark.parametrize(
    ("kind", "switches", "expected"),
    [
        ("fhir", {"reject": True}, ChannelRejected),
        ("fhir", {"code": "transient-error"}, ChannelUnavailable),
        ("fhir", {"down": True}, ChannelUnavailable),
        ("fhir", {"status": 400}, ChannelRejected),
        ("fhir", {"status": 404}, ChannelRejected),
        ("fhir", {"status": 408}, ChannelUnavailable),
        ("fhir", {"status": 429}, ChannelUnavailable),
        ("fhir", {"status": 500}, ChannelUnavailable),
        ("fhir", {"delay": FAST + 0.5}, ChannelUnavailable),
        ("hl7v2", {"reject": True}, ChannelRejected),
        ("hl7v2", {"code": "CE"}, ChannelRejected),
        ("hl7v2", {"code": "AR"}, ChannelUnavailable),
        ("hl7v2", {"code": "CR"}, ChannelUnavailable),
        ("hl7v2", {"down": True}, ChannelUnavailable),
        ("hl7v2", {"delay": FAST + 0.5}, ChannelUnavailable),
    ],
)
async def test_failures_map_to_unavailable_or_rejected(
    kind: str,
    switches: dict[str, Any],
    expected: type[Exception],
    fhir: FhirReceiver,
    mllp: MllpReceiver,
) -> None:
    rx, channel, address = endpoints(kind, fhir, mllp)
    rx.set(**switches)
    with pytest.raises(expected) as info:
        await channel.deliver(ctx(address))
    assert str(info.value)  # a reason for operations staff
    if switches.get("reject"):  # with the receiver's own words
        assert "känner inte till enheten" in str(info.value)
        assert kind == "fhir" or "AE" in str(info.value)


@pytest.mark.parametrize(
    ("switches", "words"),
    [({"asynchronous": True}, "kvittens väntas"), ({"status": 200}, "utan kvittens")],
)
async def test_fhir_without_a_receipt_is_delivered(
    fhir: FhirReceiver, switches: dict[str, Any], words: str
) -> None:
    for name, value in switches.items():
        setattr(fhir, name, value)
    outcome = await fhir_channel().deliver(ctx(fhir.url))
    assert outcome.state is State.DELIVERED and words in outcome.detail


async def test_fhir_receiver_away_or_not_configured_is_unavailable(fhir: FhirReceiver) -> None:
    fhir.stop()
    try:
        with pytest.raises(ChannelUnavailable, match="Kunde inte nå"):
            await fhir_channel().deliver(ctx(fhir.url))
    finally:
        fhir.start()
    with pytest.raises(ChannelUnavailable, match="Ingen FHIR-adress"):
        await fhir_channel().deliver(ctx(""))
    assert (await fhir_channel().deliver(ctx(fhir.url))).state is State.RECEIVED


# --- HL7 v2 over MLLP --------------------------------------------------------------------


@pytest.mark.parametrize("code", ["AA", "CA"])
async def test_hl7_accept_is_received(mllp: MllpReceiver, code: str) -> None:
    mllp.code = code
    outcome = await hl7_channel().deliver(ctx(mllp.address))
    assert outcome.state is State.RECEIVED and code in outcome.detail
    assert strict_problems(mllp.received[0]) == []  # what went over the wire, read strictly
    msg = hl7.parse(mllp.received[0])
    assert (
        str(msg["MSH.F10"]) == stable_control_id("delivery-1") and str(msg["MSH.F6"]) == HOME_CARE
    )


async def test_hl7_receiver_away_or_bad_address_is_unavailable(mllp: MllpReceiver) -> None:
    mllp.stop()
    try:
        with pytest.raises(ChannelUnavailable, match="Kunde inte nå"):
            await hl7_channel().deliver(ctx(mllp.address))
    finally:
        mllp.start()
    for address in ("", "no-port", "host:99999"):
        with pytest.raises(ChannelUnavailable, match="värd:port"):
            await hl7_channel().deliver(ctx(address))
    assert (await hl7_channel().deliver(ctx(mllp.address))).state is State.RECEIVED


# --- no patient data in what the channels say --------------------------------------------


async def test_no_patient_data_in_details_or_exceptions(
    fhir: FhirReceiver, mllp: MllpReceiver
) -> None:
    """A receiver that echoes the patient back in its error text: the channels mask it."""
    pnr_dash = f"{PNR[:8]}-{PNR[8:]}"
    secrets = [PNR, pnr_dash, PNR[2:], "Tolvansson", "Tolvan"]
    texts: list[str] = []

    async def collect(channel: Any, address: str) -> None:
        try:
            outcome: Outcome = await channel.deliver(ctx(address))
            texts.append(outcome.detail)
        except (ChannelUnavailable, ChannelRejected) as exc:
            texts.append(str(exc))
            causes.extend(str(e) for e in (exc.__cause__, exc.__context__) if e is not None)

    echo = f"Patient {pnr_dash} TOLVAN tolvansson ({PNR}) finns inte hos oss"
    causes: list[str] = []
    fhir_cases: list[dict[str, Any]] = [
        {"reject": True},
        {"code": "transient-error"},
        {"status": 400},
        {"status": 503},
        {"asynchronous": True},
        {"delay": FAST + 0.5},
        {},
    ]
    for switches in fhir_cases:
        fhir.reset()
        fhir.reject_text = echo
        for name, value in switches.items():
            setattr(fhir, name, value)
        await collect(fhir_channel(), fhir.url)
    for switches in [{"reject": True}, {"code": "CE"}, {"code": "AR"}, {"down": True}, {}]:
        mllp.reset()
        mllp.reject_text = echo
        for name, value in switches.items():
            setattr(mllp, name, value)
        await collect(hl7_channel(), mllp.address)
    texts.extend(causes)
    assert len(texts) >= 12 and all(texts[:12])
    assert any("finns inte" in t for t in texts)  # the receiver's reason does get through
    for text in texts:
        for secret in secrets:
            assert secret.lower() not in text.lower(), text


# --- the HL7 v2 rendering ----------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.stem for p in GOLDEN.glob("*.json")))
def test_hl7_golden_cases(case: str) -> None:
    given_ = json.loads((GOLDEN / f"{case}.json").read_text(encoding="utf-8"))
    expected = (GOLDEN / f"{case}.hl7").read_bytes().decode("utf-8")
    made = datetime.fromisoformat(given_["made_at"])
    got = render(given_["bundle"], given_["dedup_key"], given_["recipient_hsa_id"], made_at=made)
    assert got == expected


def test_there_are_golden_cases() -> None:
    assert len(list(GOLDEN.glob("*.hl7"))) >= 3


_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x1c\x0b")
    | st.sampled_from("|^~\\&\n\r"),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 4999),
    event=st.sampled_from(list(LusEvent)),
    note=_text,
    family=_text,
    given_name=_text,
    control_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
)
def test_any_message_renders_to_er7_that_parses_back(
    n: int, event: LusEvent, note: str, family: str, given_name: str, control_id: str
) -> None:
    msg = replace(canonical(n, event=event), note=note, family=family, given=given_name)
    b = to_bundle(msg, "m")
    er7 = render(b, control_id, HOME_CARE)
    parsed = hl7.parse(er7)
    assert len(parsed) == len(er7.rstrip("\r").split("\r"))  # nothing split a segment
    assert str(parsed["MSH.F10"]) == stable_control_id(control_id)
    assert str(parsed["PID.F3.R1.C1"]) == parse_identity_number(personnummer(n)).value
    assert str(parsed.segment("MSH")[9][0][0]) in ("MDM", "ADT")
    segments = [str(seg[0]) for seg in parsed]
    if "OBX" in segments:
        assert str(parsed["OBX.F3.R1.C1"]) == event.value  # the LUS event, coded 99LUS
    assert str(parsed["PID.F5.R1.C1"]) == family  # the accessor unescapes
    obx = [parsed.unescape(str(seg(5))) for seg in parsed if str(seg[0]) == "OBX"]
    if event.value in ("patient-sammanslagning", "makulera-utskrivningsklar"):  # ADT, no text
        assert obx == []
    elif event.has_careplan and note:
        expected = note.replace("\r\n", "\n").replace("\r", "\n")
        assert "\n".join(obx) == expected
    else:
        assert obx == [event.display]


# --- the gateway's $process-message ------------------------------------------------------


@pytest.fixture
async def api(db: Database, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys]]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [], KEYER)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, keys


def integration(keys: TokenKeys, org: str = HOME_CARE, role: str = "integration") -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue(org, role, "Mottagarsystem")}


async def home_care_delivery(db: Database) -> str:
    pipeline = Pipeline(db)
    mid = await pipeline.run(canonical(1), "C-1")
    async with db.read() as conn:
        return str(
            (
                await conn.execute(
                    select(deliveries.c.id).where(
                        deliveries.c.message_id == mid, deliveries.c.recipient_hsa_id == HOME_CARE
                    )
                )
            ).scalar_one()
        )


async def delivery_state(db: Database, delivery_id: str) -> tuple[str, list[tuple[str, str]]]:
    async with db.read() as conn:
        state = (
            await conn.execute(select(deliveries.c.state).where(deliveries.c.id == delivery_id))
        ).scalar_one()
        attempts = (
            await conn.execute(
                select(delivery_attempts.c.outcome, delivery_attempts.c.detail).where(
                    delivery_attempts.c.delivery_id == delivery_id
                )
            )
        ).all()
    return state, [(a.outcome, a.detail) for a in attempts]


async def test_a_later_ok_response_records_received(api: Any, db: Database) -> None:
    client, keys = api
    delivery_id = await home_care_delivery(db)
    state, sent = await delivery_state(db, delivery_id)
    assert state == "delivered"
    for _ in range(2):  # the same receipt twice: recorded once, answered both times
        r = await client.post(
            "/fhir/$process-message",
            json=response_bundle(delivery_id, "ok"),
            headers=integration(keys),
        )
        assert r.status_code == 200, r.text
        header = r.json()["entry"][0]["resource"]
        assert header["resourceType"] == "MessageHeader" and header["response"]["code"] == "ok"
    assert await delivery_state(db, delivery_id) == ("received", sent)  # no attempt added


@pytest.mark.parametrize(
    ("code", "kind"), [("fatal-error", "rejected"), ("transient-error", "unavailable")]
)
async def test_a_later_error_response_records_an_attempt(
    api: Any, db: Database, code: str, kind: str
) -> None:
    client, keys = api
    delivery_id = await home_care_delivery(db)
    echo = f"Patient {PNR} Tolvan Tolvansson okänd"
    r = await client.post(
        "/fhir/$process-message",
        json=response_bundle(delivery_id, code, text=echo),
        headers=integration(keys),
    )
    assert r.status_code == 200, r.text
    state, attempts = await delivery_state(db, delivery_id)
    assert state == "delivered" and [a[0] for a in attempts] == ["delivered", kind]
    detail = attempts[1][1]
    assert "okänd" in detail and PNR not in detail and "Tolvan" not in detail


async def test_process_message_errors(api: Any, db: Database) -> None:
    client, keys = api
    delivery_id = await home_care_delivery(db)
    ok = response_bundle(delivery_id, "ok")
    url = "/fhir/$process-message"
    r = await client.post(url, json=ok)
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    r = await client.post(url, json=ok, headers=integration(keys, role="staff"))
    assert r.status_code == 403
    r = await client.post(url, json=ok, headers=integration(keys, org="SE5561234567-HT02"))
    assert r.status_code == 403 and "another organisation" in r.text
    r = await client.post(url, json=response_bundle("no-such-delivery"), headers=integration(keys))
    assert r.status_code == 404
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[0].resource.response.identifier"]
    clinical = to_bundle(canonical(2), "inbound-1")
    r = await client.post(url, json=clinical, headers=integration(keys))
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[0].resource.response"]
    assert "not accepted here yet" in issue["diagnostics"]
    r = await client.post(url, json={"resourceType": "Patient"}, headers=integration(keys))
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Bundle"]
    bad_code = response_bundle(delivery_id, "maybe")
    r = await client.post(url, json=bad_code, headers=integration(keys))
    assert r.status_code == 400
    state, attempts = await delivery_state(db, delivery_id)  # nothing changed by any of it
    assert state == "delivered" and [a[0] for a in attempts] == ["delivered"]


async def test_process_message_is_documented(api: Any) -> None:
    client, _ = api
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/fhir/$process-message"]["post"]
    assert {"200", "401", "403", "404", "422"} <= set(op["responses"])
    examples = op["requestBody"]["content"]["application/json"]["examples"]
    assert {"ok", "fatal-error"} <= set(examples)


async def test_asynchronous_fhir_delivery_then_receipt_end_to_end(
    api: Any, db: Database, fhir: FhirReceiver
) -> None:
    """Over the real channel: 202 from the receiver, then its response message to the
    gateway; the dedup key the receiver saw is the delivery id the ledger knows."""
    client, keys = api
    delivery_id = await home_care_delivery(db)
    fhir.asynchronous = True
    context = replace(ctx(fhir.url, key=delivery_id), delivery_id=delivery_id)
    assert (await fhir_channel().deliver(context)).state is State.DELIVERED
    seen = fhir.received[0]["entry"][0]["resource"]["id"]
    r = await client.post(
        "/fhir/$process-message", json=response_bundle(seen, "ok"), headers=integration(keys)
    )
    assert r.status_code == 200
    assert (await delivery_state(db, delivery_id))[0] == "received"
