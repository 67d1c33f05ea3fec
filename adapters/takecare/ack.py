"""HL7 v2 acknowledgements for TakeCare: build one from a parse result, read one back.

The ACK tells the sender what to fix (ERR names segment, field and table 0357 code) and
nothing about the patient: only header fields and the rejection's fixed text go in.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import hl7

from adapters.takecare.hl7in import MAPPING, STOCKHOLM, Hl7Rejection, MshHeader, codec_for

__all__ = ["ACK_CODES", "RULES", "AckRules", "build_ack", "control_id", "parse_ack"]

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


@dataclass(frozen=True, slots=True)
class AckRules:
    """What an ACK may carry in one HL7 v2 version (chapter 2 of that version)."""

    structure: bool  # MSH-9.3, the message structure ("ACK"), exists from 2.3.1
    eld: bool  # errors in ERR-1 (ELD), as up to 2.4; from 2.5 in ERR-2..ERR-8
    msa3: bool  # MSA-3 text message, withdrawn in 2.7
    charset: bool  # MSH-18, from 2.3
    namespace_max: tuple[int, int, int, int]  # MSH-3..6 (the first component)
    control_id_max: int  # MSH-10 and MSA-2


_TEXT_MAX = 80  # MSA-3, and ERR-1 (ELD) per repetition
_USER_MESSAGE_MAX = 250  # ERR-8
_OLD = AckRules(False, True, True, True, (20, 20, 20, 20), 20)
_V25 = AckRules(True, False, True, True, (20, 20, 20, 20), 20)
_V27 = AckRules(True, False, False, True, (20, 20, 20, 20), 199)
# The versions an ACK is written in as the sender's own; any other gets a v2.5 ACK.
RULES: dict[str, AckRules] = {
    "2.2": AckRules(False, True, True, False, (15, 20, 15, 20), 20),
    "2.3": _OLD,
    "2.3.1": dataclasses.replace(_OLD, structure=True),
    "2.4": dataclasses.replace(_OLD, structure=True),
    "2.5": _V25,
    "2.5.1": _V25,
    "2.6": _V25,
    "2.7": _V27,
    "2.7.1": _V27,
    "2.8": _V27,
    "2.8.1": _V27,
    "2.8.2": _V27,
}
FALLBACK_VERSION = "2.5"
_PROCESSING_IDS = frozenset({"D", "P", "T"})  # HL7 table 0103

# HL7 table 0357, message error condition codes.
ERROR_TEXT: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


def control_id() -> str:
    """A fresh MSH-10 for a message Brygga sends: 20 characters (the limit of v2.3 to 2.5),
    100 random bits, letters A-Z and digits 2-7 only, so it never needs escaping."""
    return base64.b32encode(secrets.token_bytes(15)).decode()[:20]


def escape(value: str) -> str:
    """Escape a value for the standard delimiters |^~\\& (the ACK always uses them)."""
    if not any(c in value for c in "|^~\\&\r\n"):
        return value
    return (
        value.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("~", "\\R\\")
        .replace("&", "\\T\\")
        .replace("\r", "\\X0D\\")
        .replace("\n", "\\X0A\\")
    )


def _join(parts: list[str], sep: str) -> str:
    while parts and not parts[-1]:
        parts.pop()
    return sep.join(parts)


def build_ack(
    inbound_or_header: MshHeader | Hl7Rejection,
    ack_code: str,
    *,
    ack_control_id: str | None = None,
    error: Hl7Rejection | None = None,
    text: str = "",
    request_accept_ack: bool = False,
) -> bytes:
    """An ACK answering the message whose header is given (Inbound or rejection), written in
    the sender's version as that version defines an ACK (``RULES``; v2.5 for any other).

    ``ack_control_id`` is the ACK's MSH-10 (a fresh ``control_id()`` when not given).
    ``request_accept_ack`` marks an application ACK sent as a message of its own (enhanced
    mode): MSH-15 ``AL`` asks the receiver to confirm it, so it can be resent until it is.

    Sending and receiving application/facility are swapped; MSA-2 echoes MSH-10 exactly as
    sent, so the sender matches the ACK by id, not by order. Texts too long for MSA-3 are
    cut there and given whole in ERR-8 where the version has it. Encoded in the original's
    character set when Brygga speaks it.
    """
    if ack_code not in ACK_CODES:
        raise ValueError("ack_code must be one of AA AE AR CA CE CR")
    h = inbound_or_header
    if isinstance(h, Hl7Rejection):
        h = h.header
    version = h.version if h.version in RULES else FALLBACK_VERSION
    rules = RULES[version]
    own_id = control_id() if not ack_control_id else ack_control_id
    if len(own_id) > rules.control_id_max:
        raise ValueError(f"ack_control_id longer than MSH-10 allows in v{version}")
    # answer in the sender's character set when we speak it, else in UTF-8 (declared)
    charset = h.charset if h.charset.upper() in MAPPING.charsets else "UNICODE UTF-8"
    names = [
        _namespace(value, limit)
        for value, limit in zip(
            (
                h.receiving_application,
                h.receiving_facility,
                h.sending_application,
                h.sending_facility,
            ),
            rules.namespace_max,
            strict=True,
        )
    ]
    processing = h.processing_id.upper()
    msh = [
        "MSH",
        "^~\\&",
        *names,
        datetime.now(STOCKHOLM).strftime("%Y%m%d%H%M%S%z"),
        "",
        _message_type(h.message_type, rules),
        escape(own_id),
        processing if processing in _PROCESSING_IDS else "P",
        version,
        "",
        "",
        "AL" if request_accept_ack else "",
        "NE" if request_accept_ack else "",
        "",
        charset if h.charset and rules.charset else "",
    ]
    detail = text or (error.text if error else "")
    msa3 = _cut(escape(detail), _TEXT_MAX) if rules.msa3 else ""
    msa = ["MSA", ack_code, h.control_id_er7 or escape(h.control_id), msa3]
    segments = [_join(msh, "|"), _join(msa, "|")]
    if error is not None:
        segments.append(_err(error, rules, detail))
    return ("\r".join(segments) + "\r").encode(codec_for(charset), "replace")


def _namespace(value: str, limit: int) -> str:
    """An echoed application or facility (HD-1, IS) within the version's length."""
    return _cut(escape(value), limit)


def _cut(er7: str, limit: int) -> str:
    """ER7 text cut to ``limit`` characters without splitting an escape sequence."""
    if len(er7) <= limit:
        return er7
    cut = er7[:limit]
    if cut.count("\\") % 2:  # inside an escape sequence: drop its start
        cut = cut[: cut.rindex("\\")]
    return cut


_TRIGGER = re.compile(r"[A-Z0-9]{3}")


def _message_type(inbound_type: str, rules: AckRules) -> str:
    """MSH-9: ``ACK^<trigger>`` and, from 2.3.1, ``^ACK`` (the message structure)."""
    trigger = inbound_type.partition("^")[2]
    trigger = trigger if _TRIGGER.fullmatch(trigger) else ""
    return _join(["ACK", trigger, "ACK" if rules.structure else ""], "^")


def _err(error: Hl7Rejection, rules: AckRules, detail: str) -> str:
    """ERR as the version defines it: ERR-1 (ELD) up to 2.4, ERR-2..ERR-8 from 2.5."""
    code = error.hl7_error_code
    desc = ERROR_TEXT.get(code, "")
    field = "" if error.field is None else str(error.field)
    if rules.eld:
        eld = _join([error.segment, str(error.sequence), field, f"{code}&{desc}&HL70357"], "^")
        return f"ERR|{eld}"
    location = _join(
        [
            error.segment,
            str(error.sequence),
            field,
            "" if error.repetition is None or not field else str(error.repetition),
            "" if error.component is None or not field else str(error.component),
        ],
        "^",
    )
    message = _cut(escape(detail), _USER_MESSAGE_MAX)
    err = ["ERR", "", location, f"{code}^{desc}^HL70357", "E", "", "", "", message]
    return _join(err, "|")


def parse_ack(raw: bytes) -> tuple[str, str, str | None, str]:
    """(MSA-1, MSA-2 as sent, error location as sent or None, ERR-8 or else MSA-3 text).

    The location is ERR-2 (v2.5 on) or, from an older receiver, ERR-1's segment^sequence^field.
    """
    text = raw.decode("utf-8", "replace").strip("\x0b\x1c\r\n").lstrip()
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    msg = hl7.parse(text)
    msa = msg.segment("MSA")
    code = str(msa(1)) if len(msa) > 1 else ""
    control_id = _msa2_as_sent(text)
    detail = msg.unescape(str(msa(3))) if len(msa) > 3 else ""
    location: str | None = None
    errs = [seg for seg in msg if str(seg[0]) == "ERR"]
    if errs:
        err = errs[0]
        location = str(err(2)) if len(err) > 2 and str(err(2)) else None
        if location is None and len(err) > 1 and str(err(1)):
            location = "^".join(str(err(1)).split("^")[:3]) or None
        if len(err) > 8 and str(err(8)):
            detail = msg.unescape(str(err(8)))
    return code, control_id, location, detail


def _msa2_as_sent(text: str) -> str:
    """MSA-2 with its spaces (python-hl7 strips the message's last line)."""
    sep = text[3:4] or "|"
    for line in text.split("\r"):
        if line.startswith("MSA" + sep):
            parts = line.split(sep)
            return parts[2] if len(parts) > 2 else ""
    return ""
