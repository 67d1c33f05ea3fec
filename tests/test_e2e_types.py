"""Every TakeCare message type over real MLLP sockets, through a running gateway, into inboxes.

One care episode of the golden patient (Södersjukhuset, visit V2025-0420), in the order a
ward would send it. Each step checks the commit ACK (the goldens ask for enhanced mode), the
LUS event the gateway made of it, who received it (and whether för kännedom), and what the
episode did to earlier notices (superseded, retracted), as the recipients see it in their
inboxes. Messages the goldens lack for this episode (A02, A11, A25, A40) are made from its
own messages by changing the trigger, so every type travels the same sockets.
"""

from __future__ import annotations

from typing import Any

from mappings import MAPPINGS_DIR
from tests.support import GatewayProcess, iter_segments, wait_for
from tests.test_e2e_path import inbox, ledger, message_id_of, send

GOLDEN = MAPPINGS_DIR / "takecare" / "golden"
CLINIC = "SE2321000016-V010"  # listed clinic (PD1-3)
NEEDS = "SE2120001637-B020"  # biståndshandläggare
HOME = "SE5566778899-HT01"  # hemtjänst
NIGHT = "SE5561234567-HT02"  # nattpatrull
REHAB = "SE2321000016-R040"  # primärvårdsrehab (the referral's PRD RT)
ALL = {CLINIC, NEEDS, HOME, NIGHT}


def golden(name: str) -> bytes:
    return (GOLDEN / f"{name}.hl7").read_bytes()


def retrigger(raw: bytes, trigger: str, structure: str, control_id: str) -> bytes:
    """The same message as another ADT trigger (MSH-9, EVN-1) with its own MSH-10."""
    segments = raw.replace(b"\r\n", b"\r").split(b"\r")
    out = []
    for seg in segments:
        fields = seg.split(b"|")
        if fields[0] == b"MSH":
            fields[8] = f"ADT^{trigger}^{structure}".encode()
            fields[9] = control_id.encode()
        elif fields[0] == b"EVN":
            fields[1] = trigger.encode()
        out.append(b"|".join(fields))
    return b"\r".join(out)


def merge(control_id: str) -> bytes:
    """ADT^A40 for the episode's patient: a reservnummer record merged into her personnummer,
    with the consent segment of her admission (the gate's own rules are tested elsewhere)."""
    return (
        "MSH|^~\\&|TAKECARE|SE2321000016-H001|BRYGGA|BRYGGA|20250425160000||ADT^A40^ADT_A39|"
        f"{control_id}|P|2.5|||AL|NE||UNICODE UTF-8\r"
        "EVN|A40|20250425155900\r"
        "PID|1||193804152381^^^^PNR||Andersson^Greta^^^^^L||19380415|F\r"
        "MRG|99250414A001^^^&1.2.752.97.3.1.3&ISO^RNR||||||Okänd^Kvinna\r"
        "ZSC|1|SAMTYCKE|20250414091000|SE2321000016-L777\r"
    ).encode()


def accepted(gw: GatewayProcess, raw: bytes) -> str:
    """Send; the commit ACK must be CA for this control id; returns the gateway's message id."""
    ack = send(gw, raw)
    segments = {seg[0]: seg for seg in iter_segments(ack)}
    sent_id = next(seg for seg in iter_segments(raw) if seg[0] == "MSH")[9]
    assert segments["MSA"][1] == "CA" and segments["MSA"][2] == sent_id, ack
    return message_id_of(gw, sent_id)


def settled(gw: GatewayProcess, message_id: str) -> dict[str, Any]:
    """The ledger once routing is done and every delivery has left 'accepted'/'routed'."""

    def done() -> dict[str, Any] | None:
        doc = ledger(gw, message_id)
        if doc["status"] in ("accepted", "permitted"):
            return None
        if any(d["state"] in ("accepted", "routed") for d in doc["deliveries"]):
            return None
        return doc

    return wait_for(done, what=f"message {message_id} routed and delivered")


def named(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The deliveries to the parties the message named: not the on-call unit told at once
    because a unit was closed when it came (decision 0019; depends on the hour it runs)."""
    return [d for d in doc["deliveries"] if d["role"] != "jour"]


def recipients(doc: dict[str, Any]) -> dict[str, bool]:
    """hsa id -> för kännedom, for the deliveries that reached an inbox."""
    assert all(d["state"] == "delivered" for d in named(doc)), doc["deliveries"]
    return {d["recipient"]["hsa_id"]: d["for_information"] for d in named(doc)}


def test_a_whole_episode_of_every_message_type_reaches_the_inboxes(
    gateway: GatewayProcess,
) -> None:
    gw = gateway

    def step(raw: bytes, event: str) -> tuple[str, dict[str, bool]]:
        message_id = accepted(gw, raw)
        doc = settled(gw, message_id)
        assert doc["event"] == event, (event, doc["event"])
        return message_id, recipients(doc)

    # A01: the admission notice; the listed clinic and needs assessment must act, the
    # municipality's home care and night patrol are told för kännedom.
    admit, got = step(golden("episode_01_a01_admit"), "inskrivningsmeddelande")
    assert got == {CLINIC: False, NEEDS: False, HOME: True, NIGHT: True}

    # MDM^T02 PLANERING: planning information as a document, to the parties it names, and
    # to the night patrol, which it leaves out: the directory remembers it serves her.
    plan_doc, got = step(golden("mdm_t02_planering_text"), "planeringsunderlag")
    assert got == {CLINIC: False, NEEDS: False, HOME: False, NIGHT: False}

    # A08 with an expected discharge date: a new version of the planning information; it
    # also names the night patrol, and whoever had the document version gets it too.
    plan_v2, got = step(golden("episode_02_a08_pud"), "planeringsunderlag")
    assert set(got) == ALL and not any(got.values())

    # A02: a transfer to another ward is planning information too (version 3).
    transfer, got = step(
        retrigger(golden("episode_02_a08_pud"), "A02", "ADT_A02", "SOS-EP-0002T"),
        "planeringsunderlag",
    )
    assert set(got) == ALL

    # A08 with a moved discharge date: version 4.
    plan_v4, got = step(golden("episode_03_a08_pud_moved"), "planeringsunderlag")
    assert set(got) == ALL

    # REF^I12: the referral goes to rehab and the listed clinic; it is no version of the
    # planning information, so the parties' planning notices stay current.
    referral, got = step(golden("ref_i12_rehab"), "planeringsunderlag")
    assert got == {REHAB: False, CLINIC: False}  # the listed clinic coordinates the care

    # The rest of the stay reaches all four parties. A16: ready for discharge; A25 cancels
    # it; A16 again. MDM^T02 UTSKRIVNING (a PDF) and OMVÅRDNAD (a referenced nursing
    # referral): the discharge information; A03, the discharge itself; A13 cancels the
    # discharge; A11 cancels the admission itself.
    a16 = golden("episode_04_a16_ready")
    sent: dict[str, str] = {}
    for name, raw, event in [
        ("ready", a16, "utskrivningsklar"),
        ("not_ready", retrigger(a16, "A25", "ADT_A21", "SOS-EP-4C"), "makulera-utskrivningsklar"),
        ("ready_again", retrigger(a16, "A16", "ADT_A16", "SOS-EP-4B"), "utskrivningsklar"),
        ("pdf", golden("mdm_t02_utskrivning_pdf"), "utskrivningsmeddelande"),
        ("nursing", golden("mdm_t02_omvardnad_referenced"), "utskrivningsmeddelande"),
        ("discharge", golden("episode_05_a03_discharge"), "utskrivningsmeddelande"),
        ("cancel_discharge", golden("episode_06_a13_cancel_discharge"), "makulera-utskrivning"),
        (
            "cancel_admit",
            retrigger(golden("episode_01_a01_admit"), "A11", "ADT_A09", "SOS-EP-1C"),
            "makulera-inskrivning",
        ),
    ]:
        sent[name], got = step(raw, event)
        assert set(got) == ALL, name

    # A40: her reservnummer record is merged into her personnummer; everyone who had a
    # notice about her is told, för kännedom.
    _, got = step(merge("SOS-MRG-0001"), "patient-sammanslagning")
    assert set(got) == ALL | {REHAB} and all(got.values())

    # What home care sees: each earlier version marked, each cancellation's target retracted.
    home = {n["message_id"]: n for n in inbox(gw, HOME)}
    assert home[plan_doc]["notice"] == home[plan_v2]["notice"] == "Ersatt av en nyare version"
    assert home[transfer]["notice"] == "Ersatt av en nyare version"
    assert home[plan_v4]["notice"] == "" and referral not in home
    assert home[sent["ready"]]["notice"] == "Makulerat av avsändaren"
    assert home[sent["ready_again"]]["notice"] == ""
    for retracted in ("pdf", "nursing", "discharge"):
        assert home[sent[retracted]]["notice"] == "Makulerat av avsändaren", retracted
    assert home[admit]["notice"] == "Makulerat av avsändaren"
    for cancellation in ("not_ready", "cancel_discharge", "cancel_admit"):
        assert home[sent[cancellation]]["notice"] == "", cancellation
    # The operations view lists the same four recipients for the retracted discharge.
    doc = ledger(gw, sent["discharge"])
    assert {d["recipient"]["hsa_id"] for d in named(doc)} == ALL
