"""Receipts go back to TakeCare over MLLP: a real listener stands in for TakeCare."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import hl7
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.takecare import mllp
from adapters.takecare.ack import build_ack, control_id
from adapters.takecare.hl7in import MshHeader
from adapters.takecare.receipts import REPORTED, build_oru
from gateway.demo import HOME_CARE, admission
from gateway.directory import Directory
from gateway.model.bundle import to_bundle
from gateway.pipeline.lus import NOT_LUS_REASON
from gateway.runtime import directory_path
from gateway.settings import Settings
from tests.inprocess import canonical
from tests.support import (
    AnyBroker,
    Broker,
    GatewayProcess,
    free_port,
    now_sthlm,
    personnummer,
    wait_for,
)
from tests.test_e2e_path import msa, send
from tests.test_hl7_outbound import strict_problems


class TakeCareListener:
    """An MLLP server in a thread: records what it receives; refuses the first message."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[hl7.Message] = []
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def handle(raw: bytes) -> bytes:
            message = hl7.parse(raw.decode("utf-8"))
            header = MshHeader(
                control_id=str(message.segment("MSH")[10]), version="2.5", message_type="ORU^R01"
            )
            if self.refused == 0:
                self.refused += 1
                return build_ack(header, "AE", ack_control_id="tc-1", text="busy")
            self.received.append(message)
            return build_ack(header, "AA", ack_control_id="tc-2")

        self._loop.run_until_complete(mllp.serve("127.0.0.1", self.port, handle))
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> TakeCareListener:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def oru(self) -> list[hl7.Message]:
        return [m for m in self.received if str(m.segment("MSH")[9]).startswith("ORU")]

    def application_acks(self) -> dict[str, tuple[str, str]]:
        """MSA-2 (the original MSH-10) -> (MSA-1, MSA-3) of every application ACK received."""
        acks = [m for m in self.received if str(m.segment("MSH")[9]).startswith("ACK")]
        out = {}
        for m in acks:
            msa_ = m.segment("MSA")
            out[str(msa_[2])] = (str(msa_[1]), str(msa_[3]) if len(msa_) > 3 else "")
        return out

    def statuses(self, control_id: str, recipient: str) -> list[str]:
        out = []
        for m in self.oru():
            obx = {str(s[3][0][0]): s for s in m.segments("OBX")}
            if (
                str(m.segment("OBR")[2]) == control_id
                and str(obx["MOTTAGARE"][5][0][0]) == recipient
            ):
                out.append(str(obx["STATUS"][5]))
        return out


def reporting_gateway(
    tmp_path: Path, database_url: str, broker: AnyBroker, takecare: TakeCareListener
) -> GatewayProcess:
    """A gateway that sends its receipts to ``takecare`` (retrying every 0.3 s)."""
    return GatewayProcess(
        tmp_path / "gw",
        database_url,
        broker,
        BRYGGA_TAKECARE_RECEIPTS_HOST="127.0.0.1",
        BRYGGA_TAKECARE_RECEIPTS_PORT=str(takecare.port),
        BRYGGA_TAKECARE_RETRY_SECONDS="0.3",
    )


@pytest.fixture
def takecare() -> Iterator[TakeCareListener]:
    with TakeCareListener() as listener:
        yield listener


def test_receipts_reach_takecare_in_order_with_retry(
    tmp_path: Path, database_url: str, broker: Broker, takecare: TakeCareListener
) -> None:
    gw = reporting_gateway(tmp_path, database_url, broker, takecare)
    gw.start()
    try:
        pnr = personnummer(900)
        assert msa(send(gw, admission("TC-R1", now_sthlm(), pnr=pnr)))[1] == "AA"
        notice = wait_for(
            lambda: next(
                iter(httpx.get(f"{gw.base_url}/api/v1/inbox", headers=gw.token(HOME_CARE)).json()),
                None,
            )
        )
        httpx.get(f"{gw.base_url}/api/v1/inbox/{notice['id']}", headers=gw.token(HOME_CARE))
        httpx.post(
            f"{gw.base_url}/api/v1/inbox/{notice['id']}/acknowledge",
            headers=gw.token(HOME_CARE, name="Anna Svensson", title="Undersköterska"),
        )
        wait_for(
            lambda: len(takecare.statuses("TC-R1", HOME_CARE)) == 3,
            timeout=30,
            what="three receipts for home care at TakeCare",
        )
        assert takecare.statuses("TC-R1", HOME_CARE) == ["Levererad", "Läst", "Kvitterad"]
        assert takecare.refused == 1  # the refused one was sent again, and order held
        last = next(
            m
            for m in takecare.oru()
            if str(m.segment("OBR")[2]) == "TC-R1" and "Kvitterad" in str(m)
        )
        assert str(last.segment("PID")[3][0][0]) == pnr  # TakeCare files it on its patient
        assert "Anna Svensson (Undersköterska)" in str(last.segment("NTE"))
        assert str(last.segment("MSH")[9]) == "ORU^R01^ORU_R01"
        for oru in takecare.oru():  # every receipt as a strict v2.5 reader takes it
            assert strict_problems(str(oru)) == []
            assert len(str(oru.segment("MSH")[10])) <= 20
        # Every recipient's delivery was reported (four parties in the demo admission, and
        # the on-call unit, told at once when a unit it covers is closed now: decision 0019).
        demo = Directory.load(directory_path(Settings()))
        closed = any(
            o.on_call and not o.staffed_at(datetime.now(UTC))
            for o in (demo.get(HOME_CARE), demo.get("SE2120001637-B020"))
            if o is not None
        )
        wait_for(
            lambda: len({str(m.segment("OBX")[5][0][0]) for m in takecare.oru()}) == 4 + closed,
            what="a receipt for every recipient",
        )
        # Original mode (no MSH-16): the commit ACK was the answer; no application ACK.
        assert "TC-R1" not in takecare.application_acks()

        # Enhanced mode: CA at once, then the application ACK as a message of its own.
        for control_id, consent, lus in (
            ("TC-ENH-OK", "samtycke", ""),
            ("TC-ENH-NO", "sparr", ""),
            ("TC-ENH-EJ", "", "EJ"),  # no LUS case (decision 0017): accepted, nothing sent
        ):
            message = admission(
                control_id, now_sthlm(), pnr=personnummer(901), consent=consent, lus_needs=lus
            )
            head, rest = message.split(b"\r", 1)
            fields = head.split(b"|")
            fields[14:16] = [b"AL", b"AL"]
            assert msa(send(gw, b"|".join(fields) + b"\r" + rest))[1] == "CA"
        wait_for(
            lambda: {"TC-ENH-OK", "TC-ENH-NO", "TC-ENH-EJ"} <= set(takecare.application_acks()),
            what="application ACKs",
        )
        assert takecare.application_acks()["TC-ENH-OK"][0] == "AA"
        assert takecare.application_acks()["TC-ENH-NO"] == (
            "AR",
            "Patienten har spärrat utlämnande",
        )
        assert takecare.application_acks()["TC-ENH-EJ"] == ("AA", NOT_LUS_REASON)
    finally:
        gw.stop()
    assert '"takecare.receipts.not_accepted"' in gw.logs()
    assert pnr not in gw.logs()


# --- the ORU itself, read by hl7apy (strict) ----------------------------------------------

AT = datetime(2026, 11, 23, 15, 41, tzinfo=UTC)


@pytest.mark.parametrize("state", sorted(REPORTED))
@pytest.mark.parametrize("actor", [None, ("Anna Svensson", "Undersköterska")])
def test_every_receipt_passes_strict_validation(
    state: str, actor: tuple[str, str] | None, fixed_clock: object
) -> None:
    oru = build_oru(
        control_id(),
        "TAKECARE|SE2321000016-H001",
        "TC-R1",
        to_bundle(canonical(1), "m"),
        (HOME_CARE, "Omsorgshuset Hemtjänst AB"),
        state,
        AT,
        actor,
    ).decode("utf-8")
    assert strict_problems(oru) == []
    msg = hl7.parse(oru)
    assert re.fullmatch(r"[A-Z2-7]{20}", str(msg["MSH.F10"]))
    assert str(msg["MSH.F7"]) == "20261123090000+0100"  # now (the fixed clock), not AT
    assert str(msg["OBR.F2"]) == "TC-R1" and str(msg["MSH.F12"]) == "2.5"


def test_a_wrong_receipt_is_reported() -> None:
    """The check can fail: a 36-character MSH-10 (the old uuid) and an ORU without OBR."""
    good = build_oru(
        control_id(),
        "TAKECARE|X",
        "TC-1",
        to_bundle(canonical(1), "m"),
        ("H", "N"),
        "read",
        AT,
        None,
    ).decode()
    long_id = good.replace(str(hl7.parse(good)["MSH.F10"]), "6d1f4a52-0000-4e8e-9a57-000000000022")
    assert any("MSH-10" in p for p in strict_problems(long_id))
    no_obr = "\r".join(s for s in good.split("\r") if not s.startswith("OBR"))
    assert strict_problems(no_obr)


_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("|^~\\&\n\r"),
    max_size=300,
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    app=_text,
    facility=_text,
    original=_text,
    name=_text,
    actor=st.none() | st.tuples(_text, _text),
    family=_text,
    state=st.sampled_from(sorted(REPORTED)),
)
def test_any_receipt_content_passes_strict_validation(
    app: str,
    facility: str,
    original: str,
    name: str,
    actor: tuple[str, str] | None,
    family: str,
    state: str,
) -> None:
    bundle = to_bundle(replace(canonical(2), family=family), "m")
    oru = build_oru(
        control_id(), f"{app}|{facility}", original, bundle, (HOME_CARE, name), state, AT, actor
    ).decode("utf-8")
    assert strict_problems(oru) == []
    assert len(hl7.parse(oru)) == len(oru.rstrip("\r").split("\r"))
