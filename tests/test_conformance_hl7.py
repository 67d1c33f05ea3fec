"""Conformance of Brygga's HL7 v2 answers, read by an independent reader.

Every message of ``tests/corpus`` (public messages of other projects), every TakeCare golden
message and a few oddities real feeds send go through the gateway's MLLP listener over one
real connection. Each ACK is read back with hl7apy (strict, in the ACK's own version) and
checked against HL7 chapter 2 of that version: field lengths, MSH-9, ERR, MSA-2 equal to the
sender's MSH-10 byte for byte, and the decision the parser took (AA for a message it
accepts, AE/AR naming segment and field for one it refuses). Then the application ACK of
enhanced mode: exactly one when MSH-16 asks for it, whatever MSH-15 says.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hl7apy import SUPPORTED_LIBRARIES
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import get_message_info, parse_segments
from hl7apy.validation import Validator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from adapters.takecare import mllp
from adapters.takecare.ack import build_ack, parse_ack
from adapters.takecare.hl7in import Hl7Rejection, MshHeader, parse, read_header
from adapters.takecare.receipts import ReceiptSettings, ReceiptsToTakeCare, Sender
from adapters.takecare.source import TakeCareSource
from gateway.bus.topics import Event
from gateway.pipeline.intake import Intake
from gateway.settings import Settings
from gateway.sources import SourceContext
from gateway.store.db import Database
from gateway.store.tables import messages
from mappings import MAPPINGS_DIR
from tests.inprocess import KEYER
from tests.test_takecare_parse import CORPUS, _split_messages

GOLDEN = MAPPINGS_DIR / "takecare" / "golden"
ADMISSION = (GOLDEN / "adt_a01_full.hl7").read_bytes()

# Maximum lengths of HL7 v2 chapter 2, per version: MSH-10 / MSA-2, MSA-3 (None: withdrawn),
# ERR-1 (ELD, each repetition), ERR-8. The ACK's version decides which apply.
_V23 = (20, 80, 80, None)
_V25 = (20, 80, None, 250)
_V27 = (199, None, None, 250)
LENGTHS: dict[str, tuple[int, int | None, int | None, int | None]] = {
    "2.2": _V23,
    "2.3": _V23,
    "2.3.1": _V23,
    "2.4": _V23,
    "2.5": _V25,
    "2.5.1": _V25,
    "2.6": _V25,
    "2.7": _V27,
    "2.8": _V27,
    "2.8.1": _V27,
    "2.8.2": _V27,
}
# Versions whose senders get an ACK in their own version: those hl7apy can check except
# v2.1 (whose MSH-9 cannot name an ACK's trigger); any other version gets v2.5.
OWN_VERSION = set(SUPPORTED_LIBRARIES) - {"2.1"}
NO_STRUCTURE = {"2.2", "2.3"}  # MSH-9 has two components before v2.3.1
COMMIT_LEVEL = {"AA": "CA", "AE": "CE", "AR": "CR"}


# --------------------------------------------------------------------------- the reader


def read_strictly(ack: str) -> Message:
    """The ACK as hl7apy reads it under strict validation; raises where it is not valid."""
    encoding, _, version = get_message_info(ack)
    msg = Message("ACK", version=version, validation_level=VALIDATION_LEVEL.STRICT)
    msg.children = parse_segments(
        ack, version, encoding, VALIDATION_LEVEL.STRICT, msg.reference, True
    )
    Validator.validate(msg)
    return msg


def _fields(segment: str) -> list[str]:
    """Fields of one segment by HL7 number: [0] is the id; for MSH [1] is the separator."""
    parts = segment.split("|")
    return ["MSH", "|", *parts[1:]] if parts[0] == "MSH" else parts


def _decode(ack: bytes) -> str:
    """The ACK as text, in the character set its MSH-18 declares."""
    charset = _fields(ack.split(b"\r", 1)[0].decode("ascii", "replace"))
    latin1 = len(charset) > 18 and charset[18] == "8859/1"
    return ack.decode("latin-1" if latin1 else "utf-8")


@dataclass(frozen=True)
class Sent:
    """What the test sent and what it expects, decided from the parser's verdict."""

    name: str
    raw: bytes
    control_id: str  # MSH-10 as sent, spaces kept
    version: str
    trigger: str
    code: str | None  # the answer's MSA-1; None: no answer (MSH-15 NE and accepted)
    rejection: Hl7Rejection | None


def _expected_code(outcome: str, msh15: str, msh16: str) -> str | None:
    """HL7 v2 chapter 2: original mode answers AA/AE/AR; enhanced mode (MSH-15 or MSH-16
    valued) answers CA/CE/CR when MSH-15 asks (AL/empty always, SU success, ER errors);
    a refusal nobody asked an accept ACK for is still answered AE/AR."""
    if not msh15 and not msh16:
        return outcome
    ok = outcome == "AA"
    if msh15 in ("", "AL") or (msh15 == "SU" and ok) or (msh15 == "ER" and not ok):
        return COMMIT_LEVEL[outcome]
    return None if ok else outcome


def expectation(name: str, raw: bytes) -> Sent:
    """Read the sender's MSH by hand (independent of the gateway) and ask the parser."""
    text = raw.decode("latin-1").lstrip("\ufeff\xef\xbb\xbf")
    msh = _fields(re.split(r"\r\n|\r|\n", text, maxsplit=1)[0])
    get = lambda n: msh[n] if n < len(msh) else ""  # noqa: E731
    try:
        parse(raw)
        rejection, outcome = None, "AA"
    except Hl7Rejection as rej:
        rejection, outcome = rej, rej.ack_code
    msh15 = get(15).strip().upper()
    msh16 = get(16).strip().upper()
    return Sent(
        name=name,
        raw=raw,
        control_id=get(10),
        version=get(12).split("^")[0].strip(),
        trigger=(get(9).split("^") + [""])[1].strip().upper(),
        code=_expected_code(outcome, msh15, msh16),
        rejection=rejection,
    )


def check_ack(sent: Sent, ack: bytes) -> None:
    """Everything a strict receiver checks in the answer to ``sent``."""
    text = _decode(ack)
    segments = [s for s in text.split("\r") if s]
    assert [s[:3] for s in segments[:2]] == ["MSH", "MSA"], sent.name
    msh, msa = _fields(segments[0]), _fields(segments[1])
    version = msh[12]
    assert version == (sent.version if sent.version in OWN_VERSION else "2.5"), sent.name
    read_strictly(text)  # hl7apy, strict, in the ACK's version
    control_max, msa3_max, eld_max, err8_max = LENGTHS[version]
    # MSH-9: ACK^trigger, and from v2.3.1 the structure ACK
    msh9 = msh[9].split("^")
    assert msh9[0] == "ACK"
    if sent.trigger and re.fullmatch(r"[A-Z0-9]{3}", sent.trigger):
        assert msh9[1] == sent.trigger, sent.name
    assert len(msh9) <= 2 if version in NO_STRUCTURE else msh9[2:] == ["ACK"], sent.name
    assert 0 < len(msh[10]) <= control_max, sent.name
    # MSA-2: the sender's MSH-10 exactly (its length is the sender's business)
    assert msa[2] == sent.control_id, sent.name
    assert msa[1] == sent.code, sent.name
    if msa3_max is None:
        assert len(msa) <= 3 or not msa[3], sent.name  # MSA-3 withdrawn
    elif len(msa) > 3:
        assert len(msa[3]) <= msa3_max, sent.name
    errors = [_fields(s) for s in segments[2:] if s.startswith("ERR")]
    rej = sent.rejection
    if rej is None:
        assert not errors, sent.name
        return
    assert len(errors) == 1, sent.name
    err = errors[0]
    field = "" if rej.field is None else str(rej.field)
    if eld_max is not None:  # up to v2.4: ERR-1 (ELD) only
        assert len(err) == 2 and len(err[1]) <= eld_max, sent.name
        location = err[1].split("^")
    else:  # from v2.5: ERR-2 (ERL), ERR-3 (table 0357), ERR-4 severity, ERR-8 text
        assert len(err) < 2 or not err[1], sent.name
        location = err[2].split("^")
        assert err[3].split("^")[0] == str(rej.hl7_error_code), sent.name
        assert err[4] == "E"
        if err8_max is not None and len(err) > 8:
            assert len(err[8]) <= err8_max, sent.name
    assert location[0] == rej.segment, sent.name
    if field:
        assert location[2] == field, sent.name


# --------------------------------------------------------------------------- messages


def _set_msh(raw: bytes, **fields: str) -> bytes:
    """A copy of ``raw`` with MSH fields replaced (f10="X" sets MSH-10)."""
    head, newline, rest = re.split(rb"(\r\n|\r|\n)", raw, maxsplit=1)
    parts = head.split(b"|")
    for key, value in fields.items():
        n = int(key[1:]) - 1
        parts += [b""] * (n + 1 - len(parts))
        parts[n] = value.encode()
    return b"|".join(parts) + newline + rest


def _corpus() -> list[tuple[str, bytes]]:
    return [
        (f"{path.relative_to(CORPUS)}#{i}", msg)
        for path in sorted(CORPUS.glob("**/*.hl7"))
        for i, msg in enumerate(_split_messages(path.read_bytes()), 1)
    ]


def _golden() -> list[tuple[str, bytes]]:
    """The TakeCare goldens, each with an MSH-10 of its own (they share some)."""
    out = []
    for i, path in enumerate(sorted(GOLDEN.glob("*.hl7"))):
        out.append((path.name, _set_msh(path.read_bytes(), f10=f"GOLD-{i:03d}")))
    return out


def _oddities() -> list[tuple[str, bytes]]:
    """What real feeds send that the public corpora lack, on the golden admission."""
    pid3_empty = re.sub(rb"\rPID\|([^|]*)\|([^|]*)\|[^|]*", rb"\rPID|\1|\2|", ADMISSION)
    out = [
        ("msh10-spaces", _set_msh(ADMISSION, f10="  ODD-SPACES-1 ")),
        ("msh10-too-long", _set_msh(ADMISSION, f10="ODD-" + "9" * 30)),
        ("msh10-escaped", _set_msh(ADMISSION, f10="ODD\\T\\ESC-1")),
        ("ne-al", _set_msh(ADMISSION, f10="ODD-NE-AL", f15="NE", f16="AL")),
        ("ne-ne", _set_msh(ADMISSION, f10="ODD-NE-NE", f15="NE", f16="NE")),
        ("al-al", _set_msh(ADMISSION, f10="ODD-AL-AL", f15="AL", f16="AL")),
        ("empty-al", _set_msh(ADMISSION, f10="ODD-EMPTY-AL", f16="AL")),
        ("er-al", _set_msh(ADMISSION, f10="ODD-ER-AL", f15="ER", f16="AL")),
        ("su-al-refused", _set_msh(pid3_empty, f10="ODD-SU-REF", f15="SU", f16="AL")),
        ("ne-al-refused", _set_msh(pid3_empty, f10="ODD-NE-REF", f15="NE", f16="AL")),
        ("msh4-missing", _set_msh(ADMISSION, f10="ODD-NO-MSH4", f4="")),
        ("version-2.8", _set_msh(ADMISSION, f10="ODD-V28", f12="2.8")),
        ("version-2.1", _set_msh(ADMISSION, f10="ODD-V21", f12="2.1")),
        ("version-none", _set_msh(ADMISSION, f10="ODD-NO-VERSION", f12="")),
        ("trigger-missing", _set_msh(ADMISSION, f10="ODD-NO-TRIGGER", f9="ADT")),
    ]
    for version in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1"):
        tag = version.replace(".", "")
        out.append((f"accepted-{version}", _set_msh(ADMISSION, f10=f"ODD-OK-{tag}", f12=version)))
        out.append((f"refused-{version}", _set_msh(pid3_empty, f10=f"ODD-AE-{tag}", f12=version)))
    return out


ALL = _corpus() + _golden() + _oddities()


# --------------------------------------------------------------------------- the gateway


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: this checks the answers, not the store (the store has its own tests)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'brygga.db'}"


@pytest.fixture
async def gateway(db: Database) -> AsyncIterator[int]:
    """The TakeCare MLLP listener with its real intake (SQLite), on a free port."""
    source = TakeCareSource()
    await source.start(SourceContext(Settings(mllp_port=0), Intake(db, KEYER)))
    assert source._server is not None
    yield source._server.sockets[0].getsockname()[1]
    await source.stop()


async def _exchange(port: int, payloads: list[bytes], answers: int) -> list[bytes]:
    """Send every payload on one connection, in one write; read ``answers`` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(mllp.frame(p) for p in payloads))
        await writer.drain()
        framer, got = mllp.Framer(), list[bytes]()
        while len(got) < answers:
            data = await asyncio.wait_for(reader.read(1 << 16), 10)
            assert data, f"closed after {len(got)} of {answers} answers"
            got += framer.feed(data)
        return got
    finally:
        writer.close()


async def test_every_message_gets_an_ack_a_strict_reader_accepts(gateway: int) -> None:
    sent = [expectation(name, raw) for name, raw in ALL]
    assert len(sent) >= 180
    answered = [s for s in sent if s.code is not None]
    began = time.monotonic()
    acks = await _exchange(gateway, [s.raw for s in sent], len(answered))
    elapsed = time.monotonic() - began
    assert len(acks) == len(answered)
    failures = []
    for s, ack in zip(answered, acks, strict=True):
        try:
            check_ack(s, ack)
        except Exception as exc:  # collect all, report together
            failures.append(f"{s.name}: {type(exc).__name__} {exc}"[:300])
    assert not failures, "\n".join(failures)
    # the decisions: the corpus (US, AU, IT data) is refused, TakeCare's own is accepted
    assert {s.code for s in answered} >= {"AA", "AE", "AR", "CA", "CE"}
    versions = {s.version for s in answered}
    assert {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"} <= versions
    assert elapsed < 30


async def test_no_answer_is_sent_where_msh15_says_never(gateway: int) -> None:
    """NE + AL accepted: nothing on the connection; the next message's ACK comes first."""
    quiet = _set_msh(ADMISSION, f10="QUIET-1", f15="NE", f16="AL")
    loud = _set_msh(ADMISSION, f10="LOUD-1", f15="", f16="")
    (ack,) = await _exchange(gateway, [quiet, loud], 1)
    assert _fields(_decode(ack).split("\r")[1])[1:3] == ["AA", "LOUD-1"]


# --------------------------------------------------------------------------- application ACK


class _TakeCare:
    """A real MLLP listener standing in for TakeCare's: records every message it gets."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.server: asyncio.Server | None = None

    async def handle(self, raw: bytes) -> bytes:
        text = raw.decode("utf-8")
        self.received.append(text)
        header = MshHeader(control_id=_fields(text.split("\r")[0])[10], version="2.5")
        return build_ack(header, "CA")

    def application_acks(self, control_id: str) -> list[list[str]]:
        """MSA of every application ACK received for the message ``control_id``."""
        out = []
        for text in self.received:
            segments = text.split("\r")
            if _fields(segments[0])[9].startswith("ACK"):
                msa = _fields(segments[1])
                if msa[2] == control_id:
                    out.append(msa)
        return out


@pytest.fixture
async def takecare() -> AsyncIterator[tuple[_TakeCare, int]]:
    listener = _TakeCare()
    server = await mllp.serve("127.0.0.1", 0, listener.handle)
    yield listener, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


# (MSH-15, MSH-16, routing status) -> (answer on the connection, application ACKs)
APPLICATION_CASES = [
    ("", "", "routed", "AA", 0),
    ("AL", "AL", "routed", "CA", 1),
    ("NE", "AL", "routed", None, 1),
    ("", "AL", "routed", "CA", 1),
    ("NE", "AL", "denied", None, 1),
    ("AL", "NE", "routed", "CA", 0),
    ("NE", "NE", "routed", None, 0),
    ("AL", "ER", "routed", "CA", 0),
    ("AL", "ER", "unroutable", "CA", 1),
    ("AL", "SU", "denied", "CA", 0),
]


@pytest.mark.parametrize(("msh15", "msh16", "status", "answer", "count"), APPLICATION_CASES)
async def test_exactly_the_application_acks_asked_for(
    db: Database,
    gateway: int,
    takecare: tuple[_TakeCare, int],
    msh15: str,
    msh16: str,
    status: str,
    answer: str | None,
    count: int,
) -> None:
    listener, port = takecare
    control_id = f"APP-{msh15 or 'X'}-{msh16 or 'X'}-{status}"[:20]
    raw = _set_msh(ADMISSION, f10=control_id, f15=msh15, f16=msh16)
    probe = _set_msh(ADMISSION, f10="PROBE-1", f15="", f16="")
    acks = await _exchange(gateway, [raw, probe], 2 if answer else 1)
    msa = [_fields(_decode(a).split("\r")[1])[1:3] for a in acks]
    expected = ([[answer, control_id]] if answer else []) + [["AA", "PROBE-1"]]
    assert msa == expected
    async with db.read() as conn:
        message_id = (
            await conn.execute(select(messages.c.id).where(messages.c.control_id == control_id))
        ).scalar_one()
    stage = ReceiptsToTakeCare(db, ReceiptSettings())
    event = Event(
        id=f"message.status:{message_id}:{status}",
        type="message.status",
        message_id=message_id,
        data={"status": status},
    )
    for _ in range(2):  # a redelivered event changes nothing
        async with db.transaction() as conn:
            await stage.handle(conn, event, message_id)
    sender = Sender(db, ReceiptSettings(receipts_host="127.0.0.1", receipts_port=port))
    await sender.send_due()
    await sender.send_due()
    got = listener.application_acks(control_id)
    assert len(got) == count
    if count:
        assert got[0][1] == {"routed": "AA", "denied": "AR", "unroutable": "AE"}[status]
        read_strictly(listener.received[-1])


# --------------------------------------------------------------------------- properties

_ST = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="|^~\\&"),
    max_size=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    control_id=_ST.filter(lambda s: s.strip()),
    version=st.sampled_from(sorted(LENGTHS)),
    app=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x17F), max_size=40),
    refused=st.booleans(),
    text=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x17F), max_size=400),
)
def test_any_header_gives_an_ack_valid_in_its_version(
    control_id: str, version: str, app: str, refused: bool, text: str
) -> None:
    """Whatever the sender's MSH-10, applications and the error text, the ACK is valid for
    the sender's version and MSA-2 gives MSH-10 back as sent."""
    header = MshHeader(
        control_id=control_id.strip(),
        control_id_er7=control_id,
        sending_application=app,
        sending_facility=app,
        message_type="ADT^A01",
        version=version,
        processing_id="P",
    )
    rejection = None
    if refused:
        rejection = Hl7Rejection("AE", "PID", 1, 3, None, 102, text or "x", header=header)
    ack = build_ack(header, "AE" if refused else "AA", error=rejection, text=text)
    sent = Sent("property", b"", control_id, version, "A01", "AE" if refused else "AA", rejection)
    check_ack(sent, ack)


def test_the_reader_refuses_what_a_strict_receiver_refuses() -> None:
    """The checks can fail: a v2.5-style ACK is not valid v2.3, nor a two-part MSH-9 in 2.6."""
    bad = [
        "MSH|^~\\&|A|B|C|D|20250101120000||ACK^A01^ACK|X|P|2.3\rMSA|AA|1\r",
        "MSH|^~\\&|A|B|C|D|20250101120000||ACK^A01|X|P|2.6\rMSA|AA|1\r",
        "MSH|^~\\&|A|B|C|D|20250101120000||ACK^A01^ACK|X|P|2.4\rMSA|AE|1\rERR||PID^1^3|102\r",
        "MSH|^~\\&|A|B|C|D|20250101120000||ACK^A01^ACK|X|P|2.8\rMSA|AE|1|text\r",
    ]
    for text in bad:
        with pytest.raises(Exception):  # noqa: B017 - hl7apy raises several kinds
            read_strictly(text)
    header = MshHeader(control_id="X", control_id_er7=" X ", message_type="ADT^A01", version="2.5")
    sent = Sent("spaces", b"", " X ", "2.5", "A01", "AA", None)
    check_ack(sent, build_ack(header, "AA"))
    with pytest.raises(AssertionError):
        check_ack(sent, build_ack(MshHeader(control_id="X", version="2.5"), "AA"))


def test_corpus_paths_exist() -> None:
    assert Path(CORPUS).is_dir() and len(_corpus()) >= 150


# --------------------------------------------------------------------------- per version


def _refusal(version: str, text: str = "PID-3: required") -> tuple[MshHeader, Hl7Rejection]:
    header = MshHeader(
        control_id="C-1", control_id_er7="C-1", message_type="ADT^A01", version=version
    )
    return header, Hl7Rejection("AE", "PID", 1, 3, None, 101, text, header=header)


@pytest.mark.parametrize(
    ("version", "msh9", "err"),
    [
        ("2.3", "ACK^A01", "ERR|PID^1^3^101&Required field missing&HL70357"),
        ("2.3.1", "ACK^A01^ACK", "ERR|PID^1^3^101&Required field missing&HL70357"),
        ("2.4", "ACK^A01^ACK", "ERR|PID^1^3^101&Required field missing&HL70357"),
        ("2.5", "ACK^A01^ACK", "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3: x"),
        ("2.6", "ACK^A01^ACK", "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3: x"),
        ("2.8", "ACK^A01^ACK", "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3: x"),
    ],
)
def test_the_ack_of_each_version(version: str, msh9: str, err: str) -> None:
    header, rejection = _refusal(version, "PID-3: x")
    ack = build_ack(header, "AE", error=rejection).decode()
    msh, msa, error = ack.rstrip("\r").split("\r")
    assert _fields(msh)[9] == msh9 and _fields(msh)[12] == version
    assert len(_fields(msh)[10]) == 20
    assert msa == ("MSA|AE|C-1" if version == "2.8" else "MSA|AE|C-1|PID-3: x")
    assert error == err
    read_strictly(ack)
    assert parse_ack(ack.encode())[:3] == ("AE", "C-1", "PID^1^3")


def test_a_long_text_is_cut_in_msa3_and_given_whole_in_err8() -> None:
    text = "PID-3: " + "x" * 300
    header, rejection = _refusal("2.5", text)
    ack = build_ack(header, "AE", error=rejection).decode()
    msa, err = _fields(ack.split("\r")[1]), _fields(ack.split("\r")[2])
    assert msa[3] == text[:80] and err[8] == text[:250]
    header, rejection = _refusal("2.4", text)
    ack = build_ack(header, "AE", error=rejection).decode()
    assert _fields(ack.split("\r")[1])[3] == text[:80]
    read_strictly(ack)
    # an escape sequence is never cut in half
    header, rejection = _refusal("2.5", "y" * 78 + "|z")
    msa3 = _fields(build_ack(header, "AE", error=rejection).decode().split("\r")[1])[3]
    assert msa3 == "y" * 78


def test_msa2_is_msh10_as_sent_whatever_the_delimiters() -> None:
    spaced = _set_msh(ADMISSION, f10="  SP-1 ")
    assert read_header(spaced).control_id == "SP-1"  # the key for duplicates: trimmed
    assert parse_ack(build_ack(read_header(spaced), "AA"))[1] == "  SP-1 "
    # a sender with '#' for components: its literal '^' is escaped in the standard ACK
    other = b"MSH|#~\\&|TAKECARE|X|BRYGGA|BRYGGA|20250310142501||ADT#A01|A^B#C|P|2.5\rEVN|A01\r"
    header = read_header(other)
    assert header.control_id_er7 == "A\\S\\B^C"
    ack = build_ack(header, "AA").decode()
    assert "\rMSA|AA|A\\S\\B^C\r" in ack


def test_ack_control_ids_are_fresh_and_short() -> None:
    header, _ = _refusal("2.5")
    ids = {_fields(build_ack(header, "AA").decode().split("\r")[0])[10] for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"[A-Z2-7]{20}", i) for i in ids)
    with pytest.raises(ValueError):
        build_ack(header, "AA", ack_control_id="x" * 21)
