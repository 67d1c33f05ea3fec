"""HL7 v2 acknowledgements for TakeCare: build one from a parse result, read one back.

The ACK tells the sender what to fix (ERR names segment, field and table 0357 code) and
nothing about the patient: only header fields and the rejection's fixed text go in.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

import hl7

from adapters.takecare.hl7in import MAPPING, STOCKHOLM, Hl7Rejection, MshHeader, codec_for

__all__ = ["ACK_CODES", "build_ack", "control_id", "parse_ack"]

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
_SUPPORTED_VERSIONS = frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1"})
_ELD_VERSIONS = frozenset({"2.3", "2.3.1", "2.4"})  # ERR-1 (ELD) is the location before 2.5

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
    ack_control_id: str,
    error: Hl7Rejection | None = None,
    text: str = "",
    request_accept_ack: bool = False,
) -> bytes:
    """An HL7 v2.5 ACK answering the message whose header is given (Inbound or rejection).

    ``request_accept_ack`` marks an application ACK sent as a message of its own (enhanced
    mode): MSH-15 ``AL`` asks the receiver to confirm it, so it can be resent until it is.

    Sending and receiving application/facility are swapped; MSA-2 echoes MSH-10 so the
    sender matches the ACK by id, not by order. Encoded in the original's character set.
    """
    if ack_code not in ACK_CODES:
        raise ValueError("ack_code must be one of AA AE AR CA CE CR")
    h = inbound_or_header
    if isinstance(h, Hl7Rejection):
        h = h.header
    # answer in the sender's character set when we speak it, else in UTF-8 (declared)
    charset = h.charset if h.charset.upper() in MAPPING.charsets else "UNICODE UTF-8"
    trigger = h.message_type.split("^")[1] if "^" in h.message_type else ""
    version = h.version if h.version in _SUPPORTED_VERSIONS else "2.5"
    msh = [
        "MSH",
        "^~\\&",
        escape(h.receiving_application),
        escape(h.receiving_facility),
        escape(h.sending_application),
        escape(h.sending_facility),
        datetime.now(STOCKHOLM).strftime("%Y%m%d%H%M%S%z"),
        "",
        f"ACK^{escape(trigger)}^ACK" if trigger else "ACK",
        escape(ack_control_id),
        escape(h.processing_id) or "P",
        version,
        "",
        "",
        "AL" if request_accept_ack else "",
        "NE" if request_accept_ack else "",
        "",
        charset if h.charset else "",
    ]
    detail = text or (error.text if error else "")
    msa = ["MSA", ack_code, escape(h.control_id), escape(detail)]
    segments = [_join(msh, "|"), _join(msa, "|")]
    if error is not None:
        segments.append(_err(error, version))
    return ("\r".join(segments) + "\r").encode(codec_for(charset), "replace")


def _err(error: Hl7Rejection, version: str) -> str:
    """ERR for v2.5 (ERR-2..8) plus ERR-1 (ELD) for the v2.3/2.4 senders that read only it."""
    code = error.hl7_error_code
    desc = ERROR_TEXT.get(code, "")
    field = "" if error.field is None else str(error.field)
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
    eld = ""
    if version in _ELD_VERSIONS:
        eld = _join([error.segment, str(error.sequence), field, f"{code}&{desc}&HL70357"], "^")
    err = ["ERR", eld, location, f"{code}^{desc}^HL70357", "E", "", "", "", escape(error.text)]
    return _join(err, "|")


def parse_ack(raw: bytes) -> tuple[str, str, str | None, str]:
    """(MSA-1, MSA-2, ERR-2 location as sent or None, ERR-8 or else MSA-3 text)."""
    text = raw.decode("utf-8", "replace").strip("\x0b\x1c\r\n ")
    msg = hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))
    msa = msg.segment("MSA")
    code, control_id = str(msa(1)) if len(msa) > 1 else "", str(msa(2)) if len(msa) > 2 else ""
    detail = msg.unescape(str(msa(3))) if len(msa) > 3 else ""
    location: str | None = None
    errs = [seg for seg in msg if str(seg[0]) == "ERR"]
    if errs:
        err = errs[0]
        location = str(err(2)) if len(err) > 2 and str(err(2)) else None
        if len(err) > 8 and str(err(8)):
            detail = msg.unescape(str(err(8)))
    return code, control_id, location, detail
