"""The fault tests' counting can fail: a notice shown twice by a recipient, or missing from
one, shows up as delivered twice or lost (so their zeros mean something)."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import httpx

from adapters.takecare.mllp import frame
from tests.chaos.check import INBOX_ORGS, RECIPIENTS, Ledger, Recipients, tally


def _ledger(**message_ids: str) -> Ledger:
    """Two admissions, each with its four deliveries handed over and sent once."""
    inbox = {org: Counter(message_ids.values()) for org in INBOX_ORGS}
    return Ledger(
        control_ids=dict(message_ids),
        open_messages=0,
        states=Counter(delivered=RECIPIENTS * len(message_ids)),
        per_message=Counter({m: RECIPIENTS for m in message_ids.values()}),
        sends=Counter({f"d{i}": 1 for i in range(RECIPIENTS * len(message_ids))}),
        delivered_events=Counter(),
        inbox=inbox,
    )


def _post_fhir(recipients: Recipients, bundle_id: str, visit: str) -> None:
    bundle = {"resourceType": "Bundle", "id": bundle_id, "type": "message", "entry": [
        {"resource": {"resourceType": "Encounter", "identifier": [{"value": visit}]}}
    ]}  # fmt: skip
    httpx.post(f"{recipients.fhir.url}/$process-message", json=bundle).raise_for_status()


def _send_hl7(recipients: Recipients, control_id: str, visit: str) -> None:
    message = f"MSH|^~\\&|BRYGGA|X|LUS|Y|20261202||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
    message += f"PV1|1|I|||||||||||||||||{visit}\r"
    host, port = recipients.mllp.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(frame(message.encode()))
        assert b"MSA|AA" in sock.recv(4096)


def test_a_second_notice_for_one_admission_counts_as_delivered_twice(tmp_path: Path) -> None:
    recipients = Recipients(tmp_path)
    try:
        for cid in ("CAB000001", "CAB000002"):
            _post_fhir(recipients, f"key-{cid}", f"V{cid}")
            _send_hl7(recipients, f"out-{cid}", f"V{cid}")
        _post_fhir(recipients, "key-CAB000001", "VCAB000001")  # a resend: shown once
        ledger = _ledger(CAB000001="m1", CAB000002="m2")
        clean = tally(ledger, ["CAB000001", "CAB000002"], recipients, 0)
        assert (clean["lost"], clean["duplicated"], clean["stuck"]) == (0, 0, 0)

        _send_hl7(recipients, "another-key", "VCAB000002")  # a new notice, same admission
        twice = tally(ledger, ["CAB000001", "CAB000002"], recipients, 0)
        assert twice["duplicated"] == 1

        lost = tally(ledger, ["CAB000001", "CAB000002", "CAB000003"], recipients, 0)
        assert lost["lost"] == 1
    finally:
        recipients.stop()


def test_a_notice_missing_from_the_inbox_counts_as_lost(tmp_path: Path) -> None:
    recipients = Recipients(tmp_path)
    try:
        _post_fhir(recipients, "k1", "VCAB000001")
        _send_hl7(recipients, "o1", "VCAB000001")
        ledger = _ledger(CAB000001="m1")
        ledger.inbox[INBOX_ORGS[1]].clear()
        assert tally(ledger, ["CAB000001"], recipients, 0)["lost"] == 1
        ledger = _ledger(CAB000001="m1")
        ledger.states["routed"] = 1
        assert tally(ledger, ["CAB000001"], recipients, 0)["stuck"] == 1
        on_its_way = _ledger(CAB000002="m2")  # at no recipient yet, and still routed
        on_its_way.states["routed"] = 1
        on_its_way.unsettled = {"m2"}
        figures = tally(on_its_way, ["CAB000002"], recipients, 0)
        assert (figures["lost"], figures["stuck"]) == (0, 1)
    finally:
        recipients.stop()
