"""The whole path on real parts: MLLP in, store, Kafka, inbox, receipts, on both databases."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import hl7
import httpx
import pytest
from hl7.client import MLLPClient
from sqlalchemy import func, select

from gateway.demo import HOME_CARE, admission
from gateway.directory import Directory
from gateway.runtime import directory_path
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages, outbox
from tests.support import (
    AnyBroker,
    GatewayProcess,
    iter_segments,
    now_sthlm,
    personnummer,
    wait_for,
)

NIGHT_CARE = "SE5561234567-HT02"
OPS = "SE2321000016-OPS1"
STATES = ["accepted", "routed", "delivered", "read", "acknowledged"]


def msa(ack: bytes | str) -> list[str]:
    raw = ack.encode() if isinstance(ack, str) else ack
    return next(seg for seg in iter_segments(raw) if seg[0] == "MSA")


def err(ack: bytes) -> list[str] | None:
    return next((seg for seg in iter_segments(ack) if seg[0] == "ERR"), None)


def send(gw: GatewayProcess, message: bytes) -> bytes:
    with MLLPClient("127.0.0.1", gw.mllp_port, encoding="utf-8") as client:
        client.socket.settimeout(15)
        return client.send_message(message).strip(b"\x0b\x1c\r")


def inbox(gw: GatewayProcess, org: str = HOME_CARE) -> list[dict]:
    r = httpx.get(f"{gw.base_url}/api/v1/inbox", headers=gw.token(org))
    r.raise_for_status()
    return r.json()


def ledger(gw: GatewayProcess, message_id: str) -> dict:
    r = httpx.get(f"{gw.base_url}/api/v1/messages/{message_id}", headers=gw.token(OPS, "ops"))
    r.raise_for_status()
    return r.json()


def message_id_of(gw: GatewayProcess, control_id: str) -> str:
    """The gateway's id of the message sent with this MSH-10 (the ACK's own MSH-10 is not it:
    HL7 limits MSH-10 to 20 characters)."""
    r = httpx.get(
        f"{gw.base_url}/api/v1/messages",
        params={"control_id": control_id},
        headers=gw.token(OPS, "ops"),
    )
    r.raise_for_status()
    (message_id,) = r.json()["ids"]
    return str(message_id)


def count_rows(url: str, table, **where) -> int:  # type: ignore[no-untyped-def]
    async def go() -> int:
        db = Database(url)
        try:
            async with db.read() as conn:
                q = select(func.count()).select_from(table)
                for col, value in where.items():
                    q = q.where(table.c[col] == value)
                return int((await conn.execute(q)).scalar_one())
        finally:
            await db.close()

    return asyncio.run(go())


def test_admission_reaches_home_care_and_ledger_moves_through_every_state(
    gateway: GatewayProcess,
) -> None:
    sent_at = now_sthlm()
    ack = send(gateway, admission("E2E-1", sent_at, pnr=personnummer(1)))
    fields = msa(ack)
    assert fields[1] == "AA" and fields[2] == "E2E-1"
    # The needs assessment keeps office hours: closed now, its on-call unit is told at once
    # (decision 0019). (Read after the send: a send on the hour's edge may fall either way.)
    bistand = Directory.load(directory_path(Settings())).get("SE2120001637-B020")
    assert bistand is not None
    closed = {"SE2120001637-T050"} if not bistand.staffed_at(sent_at) else set()

    notice = wait_for(lambda: next(iter(inbox(gateway)), None), what="notice in home-care inbox")
    assert notice["event"] == "inskrivningsmeddelande"
    assert notice["state"] == "delivered"
    message_id = notice["message_id"]
    # The night patrol was named in the message too and gets its own copy.
    wait_for(lambda: inbox(gateway, NIGHT_CARE), what="notice in night-care inbox")

    opened = httpx.get(
        f"{gateway.base_url}/api/v1/inbox/{notice['id']}",
        headers=gateway.token(HOME_CARE, name="Anna Svensson"),
    )
    assert opened.status_code == 200
    assert opened.json()["bundle"]["type"] == "message"
    acked = httpx.post(
        f"{gateway.base_url}/api/v1/inbox/{notice['id']}/acknowledge",
        # The kvittens is signed by the token's person; a name in the body changes nothing.
        headers=gateway.token(HOME_CARE, name="Anna Svensson", title="Undersköterska"),
        json={"name": "Dr. Nobody", "role": "Överläkare"},
    )
    assert acked.status_code == 200 and acked.json()["already_acknowledged"] is False

    ledger_doc = wait_for(lambda: (d := ledger(gateway, message_id))["status"] and d, what="ledger")
    home = next(d for d in ledger_doc["deliveries"] if d["recipient"]["hsa_id"] == HOME_CARE)
    assert [r["state"] for r in home["receipts"]] == STATES
    times = [datetime.fromisoformat(r["at"]) for r in home["receipts"]]
    assert times == sorted(times)
    assert home["receipts"][-1]["by"] == {
        "name": "Anna Svensson",
        "role": "Undersköterska",
        "org": HOME_CARE,
    }
    assert ledger_doc["consent"]["decision"] == "permit"
    # Every named party in the directory got a delivery; nobody was left in "routed".
    parties = {d["recipient"]["hsa_id"] for d in ledger_doc["deliveries"]}
    assert parties - closed == {
        HOME_CARE,
        NIGHT_CARE,
        "SE2120001637-B020",
        "SE2321000016-V010",
    }
    assert parties >= closed

    # Acknowledging again changes nothing.
    again = httpx.post(
        f"{gateway.base_url}/api/v1/inbox/{notice['id']}/acknowledge",
        headers=gateway.token(HOME_CARE),
        json={"name": "B", "role": "C"},
    )
    assert again.json()["already_acknowledged"] is True

    elsewhere = gateway.cli("token", "--org", HOME_CARE, "--name", "Anna Svensson")
    assert elsewhere.returncode == 0 and elsewhere.stdout.count(".") == 2  # a JWT
    status = gateway.cli("status", message_id)
    assert status.returncode == 0, status.stderr
    for state in STATES:
        assert state in status.stdout
    # The deliveries and the reads above are in the audit trail, and it is intact.
    audited = gateway.cli("audit", "verify")
    assert audited.returncode == 0 and "intact" in audited.stdout, audited.stdout


def test_same_control_id_twice_gives_same_ack_and_one_delivery(gateway: GatewayProcess) -> None:
    message = admission("E2E-DUP", now_sthlm(), pnr=personnummer(2))
    first = send(gateway, message)
    second = send(gateway, message)
    assert msa(first)[1] == "AA"
    assert first == second
    wait_for(lambda: inbox(gateway), what="notice")
    assert len(inbox(gateway)) == 1
    assert count_rows(gateway.env["BRYGGA_DATABASE_URL"], messages) == 1


def test_malformed_input_is_refused_naming_segment_and_field(gateway: GatewayProcess) -> None:
    now = now_sthlm()
    good_pnr = personnummer(3)
    bad_pnr = good_pnr[:-1] + str((int(good_pnr[-1]) + 1) % 10)
    no_pid = b"\r".join(
        s
        for s in admission("E2E-NOPID", now, pnr=good_pnr).split(b"\r")
        if not s.startswith(b"PID")
    )
    cases = {
        "not hl7": (b"hello, this is not HL7", ("AR",), "MSH"),
        "wrong version": (
            admission("E2E-V", now, pnr=good_pnr, version="2.9"),
            ("AR",),
            "MSH^1^12",
        ),
        "missing PID": (no_pid, ("AE",), "PID"),
        "bad check digit": (admission("E2E-LUHN", now, pnr=bad_pnr), ("AE",), "PID^1^3"),
    }
    for name, (message, codes, location) in cases.items():
        ack = send(gateway, message)
        assert msa(ack)[1] in codes, name
        error = err(ack)
        assert error is not None, name
        assert error[2].startswith(location), (name, error)
        assert bad_pnr.encode() not in ack and good_pnr.encode() not in ack
    assert count_rows(gateway.env["BRYGGA_DATABASE_URL"], messages) == 0


def test_ack_only_after_commit(gateway: GatewayProcess) -> None:
    """Make every commit fail: the sender gets AE, never AA, and nothing half-stored remains."""
    url = gateway.env["BRYGGA_DATABASE_URL"]

    async def sabotage(on: bool) -> None:
        db = Database(url)
        try:
            async with db.transaction() as conn:
                if db.is_sqlite:
                    await conn.exec_driver_sql(
                        "CREATE TRIGGER fail_commit BEFORE INSERT ON outbox "
                        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                        if on
                        else "DROP TRIGGER fail_commit"
                    )
                elif on:
                    await conn.exec_driver_sql(
                        "CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
                    )
                    await conn.exec_driver_sql(
                        "CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON outbox "
                        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_commit()"
                    )
                else:
                    await conn.exec_driver_sql("DROP TRIGGER fail_commit ON outbox")
                    await conn.exec_driver_sql("DROP FUNCTION fail_commit()")
        finally:
            await db.close()

    message = admission("E2E-COMMIT", now_sthlm(), pnr=personnummer(4))
    asyncio.run(sabotage(True))
    ack = send(gateway, message)
    assert msa(ack)[1] == "AE"
    assert err(ack) is not None and err(ack)[3].startswith("207")
    assert count_rows(url, messages) == 0
    assert count_rows(url, outbox) == 0

    asyncio.run(sabotage(False))
    ack = send(gateway, message)  # the sender resends, as it must after AE
    assert msa(ack)[1] == "AA"
    wait_for(lambda: inbox(gateway), what="notice after resend")
    assert count_rows(url, deliveries, recipient_hsa_id=HOME_CARE) == 1


def test_enhanced_mode_gets_commit_ack(gateway: GatewayProcess) -> None:
    message = admission("E2E-ENH", now_sthlm(), pnr=personnummer(5))
    segments = message.split(b"\r")
    msh = segments[0].split(b"|")
    msh += [b""] * (17 - len(msh))
    msh[14], msh[15] = b"AL", b"NE"
    ack = send(gateway, b"\r".join([b"|".join(msh), *segments[1:]]))
    assert msa(ack)[1] == "CA" and msa(ack)[2] == "E2E-ENH"
    assert hl7.parse(ack.decode()).segment("MSA")[1][0] == "CA"
    # A rejection in enhanced mode is a commit-level reject (CR), still naming the field.
    msh[9], msh[11] = b"E2E-ENH-BAD", b"2.9"
    nack = send(gateway, b"\r".join([b"|".join(msh), *segments[1:]]))
    assert msa(nack)[1] == "CR" and err(nack)[2].startswith("MSH^1^12")


def test_split_workers_share_the_work(tmp_path, database_url: str, broker) -> None:  # type: ignore[no-untyped-def]
    """`brygga worker --stages`: intake and HTTP in one process, the pipeline in another."""
    front = GatewayProcess(
        tmp_path / "front",
        database_url,
        broker.bootstrap,
        command=("worker", "--stages", "intake,relay,api"),
    )
    back = GatewayProcess(
        tmp_path / "back",
        database_url,
        broker.bootstrap,
        command=("worker", "--stages", "consent,route,deliver,receipts,relay"),
    )
    front.start()
    # Processes of one gateway share its keys (patient HMAC, token signing).
    shutil.copytree(front.data_dir / "keys", back.data_dir / "keys")
    back.start()
    try:
        assert msa(send(front, admission("SPLIT-1", now_sthlm(), pnr=personnummer(7))))[1] == "AA"
        notice = wait_for(lambda: next(iter(inbox(front)), None), what="notice via split workers")
        assert notice["event"] == "inskrivningsmeddelande"
        assert '"intake.accepted"' not in back.logs()  # the back end never saw the MLLP side
        assert '"stage.started"' not in front.logs()
    finally:
        front.stop()
        back.stop()


@pytest.fixture
def gateway_without_sweeps(
    tmp_path: Path, database_url: str, broker: AnyBroker
) -> Iterator[GatewayProcess]:
    """A gateway whose reconciler and follow-up sweeps wait ten minutes: whatever happens
    sooner was driven by an event, not found by a periodic sweep."""
    gw = GatewayProcess(
        tmp_path / "gw",
        database_url,
        broker,
        BRYGGA_RECONCILE_AFTER_SECONDS="600",
        BRYGGA_FOLLOWUP_INTERVAL_SECONDS="600",
    )
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def test_a_held_notice_is_released_by_the_consent_itself(
    gateway_without_sweeps: GatewayProcess,
) -> None:
    """No consent in the admission: every notice waits in 'held' and TakeCare is told so;
    the hospital's system then records the consent over FHIR, and home care has the notice
    at once, over the real broker and stages: the consent's own events release it (with the
    sweeps ten minutes away, nothing else could; no wall-clock bound, so a busy machine does
    not fail it)."""
    gateway = gateway_without_sweeps
    pnr = personnummer(7)
    ack = send(gateway, admission("E2E-HOLD", now_sthlm(), pnr=pnr, consent=""))
    assert msa(ack)[1] == "AA"
    message_id = message_id_of(gateway, "E2E-HOLD")

    held = wait_for(
        lambda: (d := ledger(gateway, message_id))["status"] == "held" and d, what="held"
    )
    home = next(d for d in held["deliveries"] if d["recipient"]["hsa_id"] == HOME_CARE)
    assert home["state"] == "held"
    assert held["consent"] == {"decision": "hold", "reason": "Väntar på samtycke"}
    assert inbox(gateway) == []

    consent = {
        "resourceType": "Consent",
        "status": "active",
        "category": [
            {
                "coding": [
                    {
                        "system": "https://brygga.dev/fhir/CodeSystem/consent-basis",
                        "code": "samtycke",
                    }
                ]
            }
        ],
        "patient": {
            "identifier": {
                "system": "http://electronichealth.se/identifier/personnummer",
                "value": pnr,
            }
        },
        "provision": {"type": "permit"},
    }
    headers = gateway.token("SE2321000016-H001", "integration")
    started = time.monotonic()
    posted = httpx.post(f"{gateway.base_url}/fhir/Consent", json=consent, headers=headers)
    assert posted.status_code == 201, posted.text
    notice = wait_for(
        lambda: next(iter(inbox(gateway)), None), timeout=60, interval=0.02, what="released notice"
    )
    print(f"released {time.monotonic() - started:.2f} s after the consent was posted")
    assert notice["message_id"] == message_id
