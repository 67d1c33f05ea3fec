"""Each routing rule of 001:2604-2610 end to end: MLLP in, the broker, routing, the ledger,
on both databases, on a connection that carries every admission
(BRYGGA_TAKECARE_LUS_MARKER=required, decision 0017)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.demo import HOME_CARE, admission
from tests.support import (
    Broker,
    GatewayProcess,
    create_pg_database,
    drop_pg_database,
    now_sthlm,
    personnummer,
    wait_for,
    with_on_call,
)
from tests.test_e2e_path import NIGHT_CARE, inbox, ledger, message_id_of, msa, send

pytestmark = pytest.mark.slow

CLINIC = "SE2321000016-V010"  # PD1-3 of the demo admission: primary care
BISTAND = "SE2120001637-B020"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def lus_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """One gateway per database for the module's cases (each case its own patient)."""
    tmp: Path = tmp_path_factory.mktemp(f"lus-{request.param}")
    url = (
        f"sqlite+aiosqlite:///{tmp / 'brygga.db'}"
        if request.param == "sqlite"
        else create_pg_database()
    )
    broker = Broker(tmp)
    broker.start()
    gw = GatewayProcess(tmp / "gw", url, broker, BRYGGA_TAKECARE_LUS_MARKER="required")
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        broker.stop()
        if request.param == "postgresql":
            drop_pg_database(url)


def settled(gw: GatewayProcess, control_id: str) -> dict:
    """The message's ledger once routing has decided."""
    mid = wait_for(lambda: next(iter(_ids(gw, control_id)), None), what="message stored")
    return wait_for(
        lambda: (d := ledger(gw, mid))["status"] not in ("accepted", "permitted") and d,
        what="message routed",
    )


def _ids(gw: GatewayProcess, control_id: str) -> list[str]:
    try:
        return [message_id_of(gw, control_id)]
    except ValueError:
        return []


@pytest.mark.parametrize(
    ("n", "code", "expected"),
    [
        # Primary care only: the admission notice goes only to primary care.
        (21, "OV", {CLINIC: False}),
        # Social services only: to the municipality, and primary care "för kännedom".
        (22, "SOC", {BISTAND: False, HOME_CARE: True, NIGHT_CARE: True, CLINIC: True}),
        # Both: to both.
        (23, "BADA", {BISTAND: False, CLINIC: False, HOME_CARE: True, NIGHT_CARE: True}),
    ],
    ids=["primary-care-only", "social-services-only", "both"],
)
def test_the_admission_notice_reaches_whom_the_needs_say(
    lus_gateway: GatewayProcess, n: int, code: str, expected: dict[str, bool]
) -> None:
    control_id = f"LUS-E2E-{code}"
    ack = send(lus_gateway, admission(control_id, now_sthlm(), pnr=personnummer(n), lus_needs=code))
    assert msa(ack)[1] == "AA"
    doc = settled(lus_gateway, control_id)
    assert doc["status"] == "routed"
    told = {d["recipient"]["hsa_id"]: d["for_information"] for d in doc["deliveries"]}
    assert told == with_on_call(expected)
    # Information-only copies carry no receipt clock.
    assert all(
        (d["due"] is None) == d["for_information"]
        for d in doc["deliveries"]
        if d["recipient"]["hsa_id"] in expected
    )
    if HOME_CARE in expected:  # and the notice really arrives
        wait_for(
            lambda: any(x["message_id"] == doc["id"] for x in inbox(lus_gateway)),
            what="notice in the home-care inbox",
        )


@pytest.mark.parametrize(("n", "code"), [(24, "EJ"), (25, "")], ids=["marked-ej", "unmarked"])
def test_a_patient_who_is_no_lus_case_is_acknowledged_and_ends_not_lus(
    lus_gateway: GatewayProcess, n: int, code: str
) -> None:
    control_id = f"LUS-E2E-NOT-{n}"
    ack = send(lus_gateway, admission(control_id, now_sthlm(), pnr=personnummer(n), lus_needs=code))
    assert msa(ack)[1] == "AA"
    doc = settled(lus_gateway, control_id)
    assert doc["status"] == "not-lus"
    assert doc["deliveries"] == []
    assert doc["consent"] == {"decision": None, "reason": None}
