"""TakeCare HL7 v2 inbound: raw bytes -> :class:`Inbound` (header + canonical message).

Every message ends as an :class:`Inbound` or an :class:`Hl7Rejection` that names segment,
field and HL7 error code, so the ACK can tell the sender exactly what to fix. Rejection
texts are fixed templates: a field's value (patient data) never reaches an exception, a
log line or an ACK. Messages are split by an own lazy splitter (fields split on demand:
several times faster than the `hl7` package, and ~100x faster than hl7apy); what each
trigger means and every code map are data in ``mappings/takecare/*.toml``
(:mod:`adapters.takecare.mapping`), read once at import.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import re
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from urllib.parse import quote

import structlog

from adapters.takecare.mapping import (
    MIME,
    EventRule,
    ProtectedRule,
    TakeCareMapping,
    load_mapping,
)
from adapters.takecare.mapping import codec_for as _codec_for
from gateway.clock import STOCKHOLM
from gateway.model.bundle import (
    EJ_BEDOMD,
    Address,
    Attachment,
    CanonicalMessage,
    CareParty,
    Coding,
    ConsentBasis,
    Diagnosis,
    Document,
    MedicationEntry,
    Referral,
)
from gateway.model.events import LusEvent
from gateway.model.identifiers import (
    OID_KINDS,
    IdentifierKind,
    InvalidIdentifier,
    PatientId,
    is_hsa_id,
    parse_identity_number,
    parse_reservnummer,
)

__all__ = [
    "MAPPING",
    "Hl7Rejection",
    "Inbound",
    "MshHeader",
    "ProtectedRule",
    "TakeCareMapping",
    "codec_for",
    "load_mapping",
    "parse",
    "present_fields",
    "read_header",
    "unmapped_codes",
]

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class MshHeader:
    """What MSH said, as far as it could be read: enough to address an ACK."""

    control_id: str = ""  # MSH-10 unescaped and stripped: the key for duplicates
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""  # type^trigger, e.g. "ADT^A01"
    version: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    processing_id: str = ""
    charset: str = ""  # MSH-18 as sent (upper-cased), "" when absent
    # MSH-10 exactly as sent (spaces kept), in ER7 for the standard delimiters |^~\&: what
    # MSA-2 echoes, so the sender finds its message byte for byte.
    control_id_er7: str = ""


EMPTY_HEADER = MshHeader()
_HEADER_FIELDS = tuple(f.name for f in dataclasses.fields(MshHeader))


@dataclass(frozen=True, slots=True)
class Inbound(MshHeader):
    """An accepted message: its MSH header fields and the canonical message.

    ``canonical`` is left out of repr(): it holds names and dates of birth, and a repr
    ends up in logs and tracebacks.
    """

    canonical: CanonicalMessage = dataclasses.field(kw_only=True, repr=False)


@dataclass(eq=False)
class Hl7Rejection(Exception):
    """Why a message cannot be accepted, located as ERR-2 needs it.

    ``text`` is a fixed template (never patient data); ``header`` is what MSH said, so the
    ACK can still be addressed and matched.
    """

    ack_code: str  # "AR" (MSH level: not ours to process) or "AE" (content error)
    segment: str
    sequence: int
    field: int | None
    component: int | None
    hl7_error_code: int  # HL7 table 0357
    text: str
    repetition: int | None = None
    header: MshHeader = EMPTY_HEADER

    def __post_init__(self) -> None:
        super().__init__(self.text)

    @property
    def location(self) -> str:
        """Human form of the location, e.g. ``PID-3`` or ``ROL[2]-4``."""
        seq = f"[{self.sequence}]" if self.sequence > 1 else ""
        loc = f"{self.segment}{seq}"
        if self.field is not None:
            loc += f"-{self.field}"
            if self.component is not None:
                loc += f".{self.component}"
        return loc

    def __str__(self) -> str:
        return f"{self.ack_code} {self.location} ({self.hl7_error_code}): {self.text}"


def _ar(
    segment: str,
    field: int | None,
    code: int,
    text: str,
    *,
    sequence: int = 1,
    component: int | None = None,
) -> Hl7Rejection:
    """Reject at MSH level: the message is not one this adapter processes."""
    return Hl7Rejection("AR", segment, sequence, field, component, code, text)


def _ae(
    segment: str,
    field: int | None,
    code: int,
    text: str,
    *,
    sequence: int = 1,
    component: int | None = None,
    repetition: int | None = None,
) -> Hl7Rejection:
    """Reject for content: the sender must correct the message."""
    return Hl7Rejection("AE", segment, sequence, field, component, code, text, repetition)


MAPPING = load_mapping()


def codec_for(charset: str, mapping: TakeCareMapping = MAPPING) -> str:
    """The Python codec for an MSH-18 value ("" -> UTF-8); UTF-8 when unknown."""
    return _codec_for(charset, mapping)


# --------------------------------------------------------------------------- low level


@dataclass(frozen=True, slots=True)
class _Enc:
    """The message's delimiters and character set, needed to unescape values."""

    field: str = "|"
    comp: str = "^"
    rep: str = "~"
    esc: str = "\\"
    sub: str = "&"
    codec: str = "utf-8"


def _unescape(value: str, enc: _Enc, br: str = " ") -> str:
    """HL7 escape sequences (2.7 in chapter 2); ``br`` replaces the line-break formatting
    commands (a space in names, a newline in document text).

    One split on the escape character: text and sequences alternate, so the work is one
    pass over the value with no Python-level scanning."""
    esc = enc.esc
    if esc not in value:
        return value
    parts = value.split(esc)
    tail = ""
    if len(parts) % 2 == 0:  # an unterminated sequence at the end: kept literally
        tail = esc + parts.pop()
    known = {"F": enc.field, "S": enc.comp, "R": enc.rep, "T": enc.sub, "E": esc}
    known.update({".br": br, ".sp": br, ".ce": br})
    out = parts[:]
    for i in range(1, len(parts), 2):
        seq = parts[i]
        hit = known.get(seq)
        out[i] = hit if hit is not None else _other_escape(seq, enc.codec)
    return "".join(out) + tail


def _other_escape(seq: str, codec: str) -> str:
    """Hex data (Xhh...) decoded; highlighting (H, N), other formatting and unknown
    sequences dropped."""
    if seq[:1] == "X" and len(seq) % 2 == 1:
        with contextlib.suppress(ValueError):  # not hex: dropped like unknown escapes
            return bytes.fromhex(seq[1:]).decode(codec, "replace")
    return ""


MAX_REPETITIONS = 100
"""More repetitions of one field than any real message has (PID-3 carries a handful)."""
MAX_SEGMENTS = 5000
"""More segments than any real message has (a long MDM text is a few hundred OBX)."""
MAX_DIGITS = 15
"""Digits in a number (a dose, a priority): what a double and a JSON number hold exactly."""
MAX_CARE_PARTIES = 50
"""More care parties (ROL) than any patient has; each becomes deliveries downstream."""


def _check_repetitions(fields: list[str], sequence: int, rep: str) -> None:
    """Refuse a field with more than MAX_REPETITIONS repetitions, naming it."""
    for num, value in enumerate(fields[1:], 1):
        if value.count(rep) >= MAX_REPETITIONS:
            raise _ae(
                fields[0],
                num,
                102,
                f"{fields[0]}-{num}: more than {MAX_REPETITIONS} repetitions",
                sequence=sequence,
            )


class _Msg:
    """Segment index and typed field access over one message, split lazily.

    A segment is its line split on the field separator; repetitions, components and
    subcomponents are split only when a field is read, which is most of the speed. A
    field's repetitions are split once and kept, so reading every repetition is linear
    in the field's length (splitting again per repetition made it quadratic).
    """

    __slots__ = ("_reps", "enc", "segs")

    def __init__(self, lines: list[str], enc: _Enc) -> None:
        self.enc = enc
        self._reps: dict[tuple[int, int], list[str]] = {}
        segs: dict[str, list[list[str]]] = {}
        sep = enc.field
        for line in lines:
            fields = line.split(sep)
            found = segs.setdefault(fields[0], [])
            found.append(fields)
            if line.count(enc.rep) >= MAX_REPETITIONS:
                _check_repetitions(fields, len(found), enc.rep)
        self.segs = segs

    def first(self, name: str) -> list[str] | None:
        found = self.segs.get(name)
        return found[0] if found else None

    def reps(self, seg: list[str] | None, field: int) -> int:
        """How many repetitions the field has (0 when absent)."""
        if seg is None or field >= len(seg):
            return 0
        return seg[field].count(self.enc.rep) + 1

    def _raw(self, seg: list[str] | None, field: int, rep: int) -> str:
        if seg is None or field >= len(seg):
            return ""
        value = seg[field]
        if value and (rep > 1 or self.enc.rep in value):
            key = (id(seg), field)
            parts = self._reps.get(key)
            if parts is None:
                parts = self._reps[key] = value.split(self.enc.rep)
            return parts[rep - 1] if rep <= len(parts) else ""
        return value if rep == 1 else ""

    def get(
        self, seg: list[str] | None, field: int, comp: int = 1, sub: int = 1, rep: int = 1
    ) -> str:
        """Component ``comp``, subcomponent ``sub`` of repetition ``rep``, unescaped."""
        value = self._raw(seg, field, rep)
        if not value:
            return ""
        enc = self.enc
        if comp > 1 or enc.comp in value:
            parts = value.split(enc.comp)
            if comp > len(parts):
                return ""
            value = parts[comp - 1]
        if sub > 1 or enc.sub in value:
            parts = value.split(enc.sub)
            if sub > len(parts):
                return ""
            value = parts[sub - 1]
        return _unescape(value, enc).strip()

    def text(self, seg: list[str] | None, field: int, rep: int = 1) -> str:
        """A whole repetition as text (TX, FT): no component split, line breaks kept."""
        return _unescape(self._raw(seg, field, rep), self.enc, br="\n").rstrip()


def _ts(text: str, where: tuple[str, int, int]) -> datetime:
    """HL7 TS/DTM -> aware datetime; without an offset the time is Stockholm local time."""
    dt = _ts_or_none(text)
    if dt is None:
        seg, seq, field = where
        raise _ae(seg, field, 102, f"{seg}-{field}: not a valid HL7 timestamp", sequence=seq)
    return dt


_OFFSETS: dict[str, tzinfo] = {}


def _zone(offset: str) -> tzinfo | None:
    """'+hhmm' / '-hhmm' -> a fixed-offset zone (cached; there are few distinct ones)."""
    zone = _OFFSETS.get(offset)
    if zone is None:
        if len(offset) != 5 or not offset[1:].isdigit() or not offset[1:].isascii():
            return None
        hh, mm = int(offset[1:3]), int(offset[3:5])
        if hh > 14 or mm > 59:
            return None
        sign = -1 if offset[0] == "-" else 1
        zone = _OFFSETS.setdefault(offset, timezone(sign * timedelta(hours=hh, minutes=mm)))
    return zone


def _ts_or_none(text: str) -> datetime | None:
    text = text.strip()
    offset = ""
    for sign in "+-":
        pos = text.find(sign)
        if pos >= 0:
            text, offset = text[:pos], text[pos:]
            break
    frac = ""
    if "." in text:
        text, frac = text.split(".", 1)
        if len(text) != 14 or not 1 <= len(frac) <= 4 or not (frac.isdigit() and frac.isascii()):
            return None
    n = len(text)
    if n not in (4, 6, 8, 10, 12, 14) or not text.isdigit() or not text.isascii():
        return None
    # absent parts default to the first month/day and to 00:00:00
    month, day, hour, minute, second = (
        int(text[i : i + 2]) if i < n else (1 if i < 8 else 0) for i in range(4, 14, 2)
    )
    tz = _zone(offset) if offset else STOCKHOLM
    if tz is None:
        return None
    try:
        micro = int(frac.ljust(6, "0")) if frac else 0
        return datetime(int(text[:4]), month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


def _birth_date(text: str) -> str | None:
    """PID-7 -> FHIR date at the precision sent (YYYY, YYYY-MM or YYYY-MM-DD)."""
    digits = text.strip()
    for stop in "+-.":
        digits = digits.split(stop, 1)[0]
    dt = _ts_or_none(digits)
    if dt is None:
        return None
    if len(digits) == 4:
        return digits
    if len(digits) == 6:
        return f"{digits[:4]}-{digits[4:6]}"
    return dt.date().isoformat()


# --------------------------------------------------------------------------- framing, MSH


_STRIP = b"\x0b\x1c \t\r\n"  # MLLP bytes and blank lines around a message


def _charset_label(data: bytes) -> str:
    """MSH-18 read from the raw bytes (it must be known before the text can be decoded)."""
    end = len(data)
    for stop in (b"\r", b"\n"):
        pos = data.find(stop)
        if 0 <= pos < end:
            end = pos
    line = data[:end]
    fields = line.split(data[3:4])
    if len(fields) <= 17:
        return ""
    rep = fields[1][1:2] or b"~"
    return fields[17].split(rep)[0].decode("latin-1").strip().upper()


def _split_segments(text: str) -> list[str]:
    """Accept CR, LF or CRLF between segments; blank lines are dropped."""
    lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return [line for line in lines if line.strip()]


def _field_list(line: str) -> list[str]:
    """MSH fields by number: index n is MSH-n (index 1 the field separator itself)."""
    sep = line[3]
    parts = line.split(sep)
    return ["MSH", sep, *parts[1:]]


def _enc_of(fields: list[str], codec: str) -> _Enc:
    enc = fields[2] if len(fields) > 2 else ""
    if len(enc) < 4:
        return _Enc(field=fields[1], codec=codec)
    return _Enc(field=fields[1], comp=enc[0], rep=enc[1], esc=enc[2], sub=enc[3], codec=codec)


def _read_header(fields: list[str], enc: _Enc, charset: str) -> MshHeader:
    """Best effort: never raises, so even a rejected message gets an addressed ACK."""

    def comp(n: int, c: int = 1) -> str:
        if n >= len(fields):
            return ""
        parts = fields[n].split(enc.rep, 1)[0].split(enc.comp)
        return _unescape(parts[c - 1], enc).strip() if c <= len(parts) else ""

    mtype, trigger = comp(9).upper(), comp(9, 2).upper()
    return MshHeader(
        control_id=comp(10),
        sending_application=comp(3),
        sending_facility=comp(4),
        receiving_application=comp(5),
        receiving_facility=comp(6),
        message_type=f"{mtype}^{trigger}" if trigger else mtype,
        version=comp(12),
        accept_ack_type=comp(15).upper(),
        application_ack_type=comp(16).upper(),
        processing_id=comp(11),
        charset=charset,
        control_id_er7=_standard_er7(fields[10] if len(fields) > 10 else "", enc),
    )


_STANDARD = "|^~\\&"
_ESCAPE_LETTER = dict(zip(_STANDARD, "FSRET", strict=True))


def _standard_er7(value: str, enc: _Enc) -> str:
    """A field's ER7 text rewritten for the standard delimiters: the sender's delimiters
    become the standard ones and a standard one used as plain text is escaped, so the
    value means the same and is unchanged when the sender used the standard delimiters."""
    own = enc.field + enc.comp + enc.rep + enc.esc + enc.sub
    if own == _STANDARD or len(own) != len(_STANDARD):
        return value
    table = {ord(c): f"\\{_ESCAPE_LETTER[c]}\\" for c in _STANDARD if c not in own}
    table.update({ord(c): std for c, std in zip(own, _STANDARD, strict=True)})
    return value.translate(table)


def _valid_encoding_chars(fields: list[str]) -> bool:
    sep, enc = fields[1], fields[2] if len(fields) > 2 else ""
    chars = sep + enc
    return (
        4 <= len(enc) <= 5
        and len(set(chars)) == len(chars)
        and chars.isascii()
        and not any(c.isalnum() or c.isspace() for c in chars)
    )


def _is_segment_id(line: str, sep: str) -> bool:
    sid = line[:3]
    return (
        len(sid) == 3
        and sid.isascii()
        and sid.isalnum()
        and sid[0].isalpha()
        and sid.isupper()
        and (len(line) == 3 or line[3] == sep)
    )


def _check_segments(lines: list[str], sep: str) -> None:
    counts: dict[str, int] = {}
    prev = "MSH"
    for index, line in enumerate(lines[1:], 2):
        if index > MAX_SEGMENTS:
            raise _ae(
                prev,
                None,
                100,
                f"more than {MAX_SEGMENTS} segments in one message",
                sequence=counts.get(prev, 1),
            )
        if not _is_segment_id(line, sep):
            raise _ae(
                prev,
                None,
                100,
                f"a line after {prev} is not a segment (line break inside a field?)",
                sequence=counts.get(prev, 1),
            )
        prev = line[:3]
        counts[prev] = counts.get(prev, 0) + 1
        if prev == "MSH":
            raise _ar(
                "MSH",
                None,
                100,
                "a second MSH segment: send one message per frame",
                sequence=counts["MSH"] + 1,
            )


# --------------------------------------------------------------------------- parse


def _decode(raw: bytes | str, mapping: TakeCareMapping) -> tuple[str, str | None, str]:
    """Framing and character set: (text, codec or None when MSH-18 is unknown, MSH-18)."""
    if isinstance(raw, str):  # tolerated: tests and tools sometimes hold text
        raw = raw.encode("utf-8")
    data = raw.strip(_STRIP)
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:].lstrip(_STRIP)
    if not data.startswith(b"MSH") or len(data) < 8 or data[3:4] in b"\r\n":
        raise _ar("MSH", None, 100, "not an HL7 v2 message: the first segment must be MSH")
    charset = _charset_label(data)
    codec = mapping.charsets.get(charset)
    try:
        text = data.decode(codec or "latin-1")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text, codec, charset


def parse(
    raw: bytes,
    *,
    mapping: TakeCareMapping = MAPPING,
    default_sender: str = "",
    lus_marker: str = "optional",
) -> Inbound:
    """Parse and map one HL7 v2 message; raises :class:`Hl7Rejection` and nothing else.

    ``default_sender`` stands in for an empty MSH-4 (optional in HL7): the connection's
    configured sender (``BRYGGA_TAKECARE_SENDER``); without it such a message gets AE 101.
    ``lus_marker`` is ``BRYGGA_TAKECARE_LUS_MARKER``: "required" when the feed carries every
    admission and only a ZLU segment makes a patient a LUS case.
    """
    header = EMPTY_HEADER
    try:
        text, codec, charset = _decode(raw, mapping)
        lines = _split_segments(text)
        fields = _field_list(lines[0])
        enc = _enc_of(fields, codec or "utf-8")
        header = _read_header(fields, enc, charset)
        if codec is None:
            raise _ar("MSH", 18, 103, "MSH-18: character set not supported")
        if not _valid_encoding_chars(fields):
            raise _ar("MSH", 2, 102, "MSH-2: encoding characters are not valid")
        facility = header.sending_facility or default_sender
        rule = _check_msh(header, facility, mapping)
        _check_segments(lines, enc.field)
        read = mapping.spec_for(header.message_type).read
        msg = _Msg([line for line in lines[1:] if line[:3] in read], enc)
        sent_at = _unescape(fields[7].split(enc.comp, 1)[0], enc).strip() if len(fields) > 7 else ""
        canonical = _map(msg, header, facility, sent_at, rule, mapping, lus_marker)
        return Inbound(**{f: getattr(header, f) for f in _HEADER_FIELDS}, canonical=canonical)
    except Hl7Rejection as known:
        if known.header is EMPTY_HEADER:
            known.header = header
        raise
    except Exception as exc:  # a bug: answer AE 207, log where, never the values
        last = traceback.extract_tb(exc.__traceback__)[-1]
        log.error(
            "takecare.parse.internal_error",
            error=type(exc).__name__,
            where=f"{Path(last.filename).name}:{last.lineno}",
        )
        rejection = Hl7Rejection(
            "AE",
            "MSH",
            1,
            None,
            None,
            207,
            "internal error while mapping the message",
            header=header,
        )
        raise rejection from None


def unmapped_codes(message: CanonicalMessage) -> list[tuple[str, str]]:
    """The unit codes an accepted message used that are neither HSA-ids nor mapped in
    facilities.toml, as (field, code): for operators to map (no patient data)."""
    found: list[tuple[str, str]] = []
    if message.sender_hsa_id and not is_hsa_id(message.sender_hsa_id):
        found.append(("MSH-4", message.sender_hsa_id))
    if message.ward_code:
        found.append(("PV1-3", message.ward_code))
    return found


def read_header(raw: bytes) -> MshHeader:
    """What MSH says, from the first bytes of a message (even one refused unread, e.g. for
    its size), so the refusal can be addressed; EMPTY_HEADER when there is no MSH."""
    try:
        text, codec, charset = _decode(raw, MAPPING)
        fields = _field_list(_split_segments(text)[0])
        return _read_header(fields, _enc_of(fields, codec or "utf-8"), charset)
    except (Hl7Rejection, IndexError):
        return EMPTY_HEADER


def present_fields(
    raw: bytes, mapping: TakeCareMapping = MAPPING
) -> tuple[str, str, dict[tuple[str, int], int]]:
    """What a message carries: (MSH-9, MSH-4, {(segment, field): how many segments}).

    For the coverage report of ``brygga mappings test``: a field counts when it is not
    empty. Never raises for a message ``parse`` accepts.
    """
    text, codec, charset = _decode(raw, mapping)
    lines = _split_segments(text)
    fields = _field_list(lines[0])
    header = _read_header(fields, _enc_of(fields, codec or "utf-8"), charset)
    found: dict[tuple[str, int], int] = {}
    for line in lines:
        parts = _field_list(line) if line.startswith("MSH") else line.split(fields[1])
        for num in range(1, len(parts)):
            if parts[num].strip():
                key = (parts[0], num)
                found[key] = found.get(key, 0) + 1
    return header.message_type, header.sending_facility, found


def _check_msh(header: MshHeader, facility: str, mapping: TakeCareMapping) -> EventRule:
    """MSH-10, -12 and -9; the event rule for MSH-9 as ``facility`` (MSH-4 or fallback) has it."""
    if not header.control_id:
        raise _ar("MSH", 10, 101, "MSH-10: message control id is required")
    if not header.version:
        raise _ar("MSH", 12, 101, "MSH-12: version id is required")
    if header.version not in mapping.versions:
        raise _ar("MSH", 12, 203, "MSH-12: version not supported (2.3 to 2.5.1 are)")
    if not header.message_type:
        raise _ar("MSH", 9, 101, "MSH-9: message type is required")
    rule = mapping.rule_for(header.message_type, facility)
    if rule is not None:
        return rule
    if mapping.knows_type(header.message_type.split("^", 1)[0], facility):
        raise _ar("MSH", 9, 201, "MSH-9: trigger event not supported", component=2)
    raise _ar("MSH", 9, 200, "MSH-9: message type not supported", component=1)


def _field_name(ref: tuple[str, int]) -> str:
    return f"{ref[0]}-{ref[1]}"


def _resolve_event(m: _Msg, rule: EventRule) -> LusEvent:
    """Apply the event rule of events.toml (or the facility's) to this message."""
    if rule.by is not None:
        seg, num = rule.by
        value = m.get(m.first(seg), num).upper()
        event = rule.values.get(value) if value else None
        if event is not None:
            return event
        if rule.event is not None:
            return rule.event
        if not value:
            raise _ae(seg, num, 101, f"{seg}-{num}: required: it decides the LUS event")
        raise _ae(seg, num, 103, f"{seg}-{num}: value not in the event map (events.toml)")
    for ref, target in rule.if_absent:
        if not m.get(m.first(ref[0]), ref[1]):
            if target is None:
                raise _ar(
                    "MSH",
                    9,
                    201,
                    f"MSH-9: this trigger is not mapped without {_field_name(ref)}",
                    component=2,
                )
            return target
    if rule.event is None:  # load_mapping refuses such a rule; never reached
        raise _ar("MSH", 9, 201, "MSH-9: trigger event not supported", component=2)
    return rule.event


def _resolve_unit(code: str, mapping: TakeCareMapping) -> tuple[str, str] | None:
    """A unit code -> (HSA-id, name): the facility map first, then an HSA-id as is."""
    if code in mapping.facilities:
        return mapping.facilities[code]
    if is_hsa_id(code):
        return code, ""
    return None


def _identifiers(
    m: _Msg, seg: list[str] | None, name: str, field: int, mapping: TakeCareMapping
) -> list[PatientId]:
    """Swedish patient identifiers in a CX list (PID-3, MRG-1); foreign ones are skipped."""
    where = f"{name}-{field}"
    ids: list[PatientId] = []
    for rep in range(1, m.reps(seg, field) + 1):
        value = m.get(seg, field, 1, rep=rep)
        if not value:
            continue
        uid, ns = m.get(seg, field, 4, 2, rep=rep), m.get(seg, field, 4, 1, rep=rep)
        type_code = m.get(seg, field, 5, rep=rep).upper()
        kind = (
            OID_KINDS.get(uid.removeprefix("urn:oid:"))
            or OID_KINDS.get(ns)
            or mapping.authorities.get(ns)
            or mapping.type_codes.get(type_code)
        )
        # A type code that names no country (0203 PN): Swedish only if the value is one.
        generic = kind is None and type_code in mapping.generic_type_codes
        if generic:
            kind = mapping.generic_type_codes[type_code]
        if kind is None:
            continue  # a foreign identifier (hospital MRN, other country): not ours to key on
        try:
            if kind is IdentifierKind.RESERVNUMMER:
                patient_id = parse_reservnummer(value, uid or ns)
            else:
                patient_id = parse_identity_number(value)
        except InvalidIdentifier as exc:
            if generic:
                continue  # another country's person number: not ours to check
            raise _ae(name, field, 102, f"{where}: {exc}", component=1, repetition=rep) from None
        if patient_id not in ids:
            ids.append(patient_id)
    if not ids:
        raise _ae(
            name,
            field,
            101,
            f"{where}: no Swedish patient identifier (personnummer, samordningsnummer or "
            "reservnummer)",
        )
    return ids


def _name(m: _Msg, pid: list[str]) -> tuple[str, str]:
    """PID-5: the legal name (XPN-7 'L') when marked, else the first; given + middle names."""
    chosen = 1
    for rep in range(1, m.reps(pid, 5) + 1):
        if m.get(pid, 5, 7, rep=rep).upper() == "L":
            chosen = rep
            break
    family = m.get(pid, 5, 1, 1, rep=chosen)
    given = " ".join(p for p in (m.get(pid, 5, 2, rep=chosen), m.get(pid, 5, 3, rep=chosen)) if p)
    return family, given


# XAD-7 address types (HL7 table 0190) in order of preference: the legal address (the
# folkbokföringsadress), then the home address, then one without a type.
_ADDRESS_TYPES = ("L", "H", "")
_KOMMUNKOD = re.compile(r"\d{4}")


def _address(m: _Msg, pid: list[str] | None) -> Address | None:
    """PID-11: the folkbokföringsadress. XAD-1 street (SAD-1), XAD-2 other designation
    (c/o, apartment), XAD-3 city, XAD-5 postcode (spaces dropped: "111 22" is 11122),
    XAD-6 country, XAD-9 county/parish code: the kommunkod when it is four digits."""
    reps = m.reps(pid, 11)
    types = [m.get(pid, 11, 7, rep=rep).upper() for rep in range(1, reps + 1)]
    rep = next((types.index(t) + 1 for t in _ADDRESS_TYPES if t in types), 1 if reps else 0)
    if not rep:
        return None
    line = tuple(p for p in (m.get(pid, 11, 1, 1, rep=rep), m.get(pid, 11, 2, rep=rep)) if p)
    postcode = m.get(pid, 11, 5, rep=rep)
    compact = postcode.replace(" ", "")
    code = m.get(pid, 11, 9, rep=rep)
    address = Address(
        line=line,
        city=m.get(pid, 11, 3, rep=rep),
        postal_code=compact if compact.isdigit() and len(compact) == 5 else postcode,
        municipality=code if _KOMMUNKOD.fullmatch(code) else "",
        country=m.get(pid, 11, 6, rep=rep),
    )
    return address if address != Address() else None


def _protected(m: _Msg, mapping: TakeCareMapping) -> bool:
    for rule in mapping.protected:
        seg = m.first(rule.segment)
        for rep in range(1, m.reps(seg, rule.field) + 1):
            if m.get(seg, rule.field, rep=rep).upper() in rule.values:
                return True
    return False


def _listed_clinic(m: _Msg, pd1: list[str] | None, mapping: TakeCareMapping) -> CareParty | None:
    """PD1-3 (XON): name in XON-1, HSA-id (or a mapped unit code) in XON-10 or XON-3."""
    if pd1 is None or not any(m.get(pd1, 3, c) for c in (1, 3, 10)):
        return None
    for comp in (10, 3):
        code = m.get(pd1, 3, comp)
        unit = _resolve_unit(code, mapping) if code else None
        if unit:
            return CareParty("listed-clinic", unit[0], m.get(pd1, 3, 1) or unit[1])
    raise _ae("PD1", 3, 102, "PD1-3: listed clinic has no HSA-id (XON-10 or XON-3)", component=10)


def _care_parties(m: _Msg, mapping: TakeCareMapping) -> list[CareParty]:
    """ROL segments whose ROL-3 role is a care-party role; others (clinicians) are ignored."""
    parties: dict[CareParty, None] = {}  # ordered, and membership in O(1)
    for seq, rol in enumerate(m.segs.get("ROL", ()), 1):
        role = mapping.roles.get(m.get(rol, 3).upper())
        if role is None or m.get(rol, 2).upper() == "DE":
            continue
        code = m.get(rol, 4)
        if not code:
            raise _ae(
                "ROL",
                4,
                101,
                "ROL-4: care party HSA-id (XCN-1) is required",
                sequence=seq,
                component=1,
            )
        unit = _resolve_unit(code, mapping)
        if unit is None:
            raise _ae(
                "ROL",
                4,
                102,
                "ROL-4: care party id (XCN-1) is not an HSA-id",
                sequence=seq,
                component=1,
            )
        parties[CareParty(role, unit[0], m.get(rol, 4, 2, 1) or unit[1])] = None
        if len(parties) > MAX_CARE_PARTIES:
            raise _ae("ROL", None, 100, f"more than {MAX_CARE_PARTIES} care parties", sequence=seq)
    return list(parties)


def _consent(m: _Msg, mapping: TakeCareMapping) -> ConsentBasis | None:
    """Site segment ZSC|1|basis|decided TS|physician HSA-id."""
    zsc = m.first("ZSC")
    if zsc is None:
        return None
    code = m.get(zsc, 2).upper()
    if not code:
        raise _ae("ZSC", 2, 101, "ZSC-2: consent basis is required")
    basis = mapping.consent_basis.get(code)
    if basis is None:
        raise _ae("ZSC", 2, 103, "ZSC-2: consent basis not one of samtycke, menprovning, sparr")
    decided = m.get(zsc, 3)
    physician = m.get(zsc, 4)
    if physician and not is_hsa_id(physician):
        raise _ae("ZSC", 4, 102, "ZSC-4: physician id is not an HSA-id")
    return ConsentBasis(basis, _ts(decided, ("ZSC", 1, 3)) if decided else None, physician)


LUS_MARKER_MODES = ("optional", "required")


def _lus_needs(m: _Msg, mapping: TakeCareMapping, marker: str) -> tuple[str, ...] | None:
    """Site segment ZLU|1|needs: what the ward judged the patient to need after discharge.

    Without ZLU the message judges nothing: None on a feed of LUS cases only (``marker``
    "optional"), ``ej-bedomd`` on a feed of every admission ("required"), where what is
    not marked is no LUS case (docs/decisions/0017-lus-cases-and-needs.md)."""
    zlu = m.first("ZLU")
    if zlu is None:
        return (EJ_BEDOMD,) if marker == "required" else None
    code = m.get(zlu, 2).upper()
    if not code:
        raise _ae("ZLU", 2, 101, "ZLU-2: LUS needs code is required")
    needs = mapping.lus_needs.get(code)
    if needs is None:
        raise _ae("ZLU", 2, 103, "ZLU-2: LUS needs code not in the needs map")
    return needs


# --------------------------------------------------------------------------- clinical content

_ICD10 = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")
_ATC = re.compile(r"^[A-Z]([0-9]{2}([A-Z]([A-Z]([0-9]{2})?)?)?)?$")
_DECIMAL = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?$", re.ASCII)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")
ATC_SYSTEM = "http://www.whocc.no/atc"
TEXT_PLAIN = "text/plain; charset=utf-8"


def _diagnoses(m: _Msg, mapping: TakeCareMapping) -> list[Diagnosis]:
    """DG1: code ^ text ^ coding system (ICD-10-SE by default), type, priority, date."""
    out: list[Diagnosis] = []
    for seq, dg1 in enumerate(m.segs.get("DG1", ()), 1):
        code = m.get(dg1, 3).upper()
        if not code:
            raise _ae("DG1", 3, 101, "DG1-3: diagnosis code is required", sequence=seq)
        system_name = m.get(dg1, 3, 3).upper() or mapping.diagnosis_default_system
        system = mapping.diagnosis_systems.get(system_name)
        if system is None:
            raise _ae(
                "DG1",
                3,
                103,
                "DG1-3.3: coding system not in the diagnosis map",
                sequence=seq,
                component=3,
            )
        if not _ICD10.match(code):
            raise _ae("DG1", 3, 102, "DG1-3: not an ICD-10 code", sequence=seq, component=1)
        kind = m.get(dg1, 6).upper()
        use = mapping.diagnosis_type.get(kind) if kind else ""
        if use is None:
            raise _ae("DG1", 6, 103, "DG1-6: diagnosis type not in HL7 table 0052", sequence=seq)
        rank_text = m.get(dg1, 15)
        if rank_text and not (
            rank_text.isascii() and rank_text.isdigit() and 0 < int(rank_text) < 10**MAX_DIGITS
        ):
            raise _ae("DG1", 15, 102, "DG1-15: priority is not a positive number", sequence=seq)
        recorded = m.get(dg1, 5)
        out.append(
            Diagnosis(
                code=Coding(system, code, m.get(dg1, 3, 2)),
                use=use,
                rank=int(rank_text) if rank_text else None,
                recorded_at=_ts(recorded, ("DG1", seq, 5)) if recorded else None,
            )
        )
    return out


def _atc(m: _Msg, seg: list[str], name: str, seq: int, mapping: TakeCareMapping) -> Coding:
    """The ATC coding of RXE-2 / RXD-2: the primary or the alternate triplet."""
    if not m.get(seg, 2) and not m.get(seg, 2, 4):
        raise _ae(name, 2, 101, f"{name}-2: medication code is required", sequence=seq)
    for base in (1, 4):
        system = mapping.medication_systems.get(m.get(seg, 2, base + 2).upper())
        code = m.get(seg, 2, base).upper()
        if system and code:
            if system == ATC_SYSTEM and not _ATC.match(code):
                raise _ae(name, 2, 102, f"{name}-2: not an ATC code", sequence=seq, component=base)
            return Coding(system, code, m.get(seg, 2, base + 1))
    raise _ae(
        name,
        2,
        103,
        f"{name}-2.3: coding system is not ATC (medication map)",
        sequence=seq,
        component=3,
    )


def _decimal(m: _Msg, seg: list[str], name: str, field: int, seq: int) -> str:
    """An NM of at most MAX_DIGITS digits: more is no dose, and cannot be a JSON number."""
    value = m.get(seg, field)
    if value and not (_DECIMAL.match(value) and sum(c.isdigit() for c in value) <= MAX_DIGITS):
        raise _ae(
            name,
            field,
            102,
            f"{name}-{field}: not a number of at most {MAX_DIGITS} digits",
            sequence=seq,
        )
    return value


def _medications(m: _Msg, mapping: TakeCareMapping) -> list[MedicationEntry]:
    """The medication list: RXE (give code, dose, unit, instructions), then RXD."""
    out: list[MedicationEntry] = []
    for seq, rxe in enumerate(m.segs.get("RXE", ()), 1):
        low = _decimal(m, rxe, "RXE", 3, seq)
        high = _decimal(m, rxe, "RXE", 4, seq)
        out.append(
            MedicationEntry(
                medication=_atc(m, rxe, "RXE", seq, mapping),
                instructions=m.get(rxe, 7, 2) or m.get(rxe, 7),
                dose=low or high,
                dose_high=high if low and high and high != low else "",
                dose_unit=m.get(rxe, 5) or m.get(rxe, 5, 2),
            )
        )
    for seq, rxd in enumerate(m.segs.get("RXD", ()), 1):
        out.append(MedicationEntry(medication=_atc(m, rxd, "RXD", seq, mapping)))
    return out


def _mime(values: tuple[str, ...], seq: int, mapping: TakeCareMapping) -> str:
    """The MIME type of document content from its subtype or type of data (mdm.toml)."""
    for value in values:
        if not value:
            continue
        if "/" in value and MIME.match(value.lower()):
            return value.lower()
        hit = mapping.mime_types.get(value.upper())
        if hit:
            return hit
    if not any(values):
        raise _ae(
            "OBX",
            5,
            101,
            "OBX-5: the document's type of data or subtype is required",
            sequence=seq,
            component=3,
        )
    raise _ae("OBX", 5, 103, "OBX-5: document type not in the MIME map", sequence=seq, component=3)


def _embedded(m: _Msg, obx: list[str], seq: int, mapping: TakeCareMapping) -> Attachment:
    """OBX-5 ED: source ^ type of data ^ subtype ^ encoding ^ data."""
    mime = _mime((m.get(obx, 5, 3), m.get(obx, 5, 2)), seq, mapping)
    encoding = m.get(obx, 5, 4).upper()
    data = m.get(obx, 5, 5)
    if not data:
        raise _ae("OBX", 5, 101, "OBX-5: document data is required", sequence=seq, component=5)
    try:
        if encoding == "BASE64":
            content = base64.b64decode("".join(data.split()), validate=True)
        elif encoding == "HEX":
            content = bytes.fromhex(data)
        elif encoding in ("A", ""):
            content = data.encode("utf-8")
        else:
            raise _ae(
                "OBX",
                5,
                103,
                "OBX-5.4: encoding must be Base64, Hex or A",
                sequence=seq,
                component=4,
            )
    except (binascii.Error, ValueError):
        raise _ae(
            "OBX",
            5,
            102,
            "OBX-5.5: document data does not match its encoding",
            sequence=seq,
            component=5,
        ) from None
    return Attachment(mime, data=base64.b64encode(content).decode("ascii"))


def _referenced(m: _Msg, obx: list[str], seq: int, mapping: TakeCareMapping) -> Attachment:
    """OBX-5 RP: pointer (a URL) ^ application ^ type of data ^ subtype."""
    url = m.get(obx, 5)
    if not url:
        raise _ae("OBX", 5, 101, "OBX-5: reference pointer is required", sequence=seq)
    if not _URL.match(url):
        raise _ae("OBX", 5, 102, "OBX-5: reference pointer is not a URL", sequence=seq)
    return Attachment(_mime((m.get(obx, 5, 4), m.get(obx, 5, 3)), seq, mapping), url=url)


def _attachments(m: _Msg, identifier: str, mapping: TakeCareMapping) -> tuple[Attachment, ...]:
    """The document content: ED and RP segments as they come, TX/FT/ST lines as one text."""
    out: list[Attachment | None] = []
    lines: list[str] = []
    for seq, obx in enumerate(m.segs.get("OBX", ()), 1):
        vtype = m.get(obx, 2).upper()
        if vtype in ("TX", "FT", "ST"):
            if not lines:
                out.append(None)  # where the text goes
            lines.extend(m.text(obx, 5, rep) for rep in range(1, max(1, m.reps(obx, 5)) + 1))
        elif vtype == "ED":
            out.append(_embedded(m, obx, seq, mapping))
        elif vtype == "RP":
            out.append(_referenced(m, obx, seq, mapping))
        elif not vtype:
            raise _ae("OBX", 2, 101, "OBX-2: value type is required", sequence=seq)
        else:
            raise _ae("OBX", 2, 103, "OBX-2: a document is ED, RP, TX, FT or ST", sequence=seq)
    text = "\n".join(lines).strip("\n")
    if lines and not text:
        raise _ae("OBX", 5, 101, "OBX-5: the document text is empty")
    content = base64.b64encode(text.encode("utf-8")).decode("ascii") if lines else ""
    result = tuple(a if a is not None else Attachment(TEXT_PLAIN, data=content) for a in out)
    if result:
        return result
    if identifier and mapping.reference_url:
        url = mapping.reference_url.replace("{id}", quote(identifier, safe=""))
        return (Attachment("", url=url),)
    raise _ae("OBX", None, 100, "OBX: the document (OBX-5 as ED, RP, TX, FT or ST) is required")


def _documents(m: _Msg, mapping: TakeCareMapping) -> list[Document]:
    """MDM: TXA describes the document, the OBX segments carry or point to it."""
    txa = m.first("TXA")
    if txa is None:
        return []
    code = m.get(txa, 2).upper()
    if not code:
        raise _ae("TXA", 2, 101, "TXA-2: document type is required")
    kind = mapping.document_types.get(code)
    status_code = m.get(txa, 17).upper()
    status = mapping.document_status.get(status_code) if status_code else "final"
    if status is None:
        raise _ae("TXA", 17, 103, "TXA-17: completion status not in HL7 table 0271")
    author = m.get(txa, 9)
    if author and not is_hsa_id(author):
        raise _ae("TXA", 9, 102, "TXA-9: originator id is not an HSA-id", component=1)
    created = m.get(txa, 6)
    identifier = m.get(txa, 12)
    return [
        Document(
            type_code=code,
            title=m.get(txa, 2, 2) or (kind.title if kind else "") or code,
            attachments=_attachments(m, identifier, mapping),
            identifier=identifier,
            created_at=_ts(created, ("TXA", 1, 6)) if created else None,
            status=status,
            author_hsa_id=author,
            flags=kind.flags if kind else (),
        )
    ]


def _referral(m: _Msg, mapping: TakeCareMapping) -> Referral | None:
    """REF: RF1 says what kind of referral, the PRD with role RT to whom."""
    rf1 = m.first("RF1")
    if rf1 is None:
        return None
    type_code = m.get(rf1, 3).upper()
    if not type_code:
        raise _ae("RF1", 3, 101, "RF1-3: referral type is required")
    role = mapping.referral_types.get(type_code)
    if role is None:
        raise _ae("RF1", 3, 103, "RF1-3: referral type not in the referral map")
    priority_code = m.get(rf1, 2).upper()
    priority = mapping.referral_priority.get(priority_code) if priority_code else ""
    if priority is None:
        raise _ae("RF1", 2, 103, "RF1-2: priority not in HL7 table 0280")
    to: CareParty | None = None
    for seq, prd in enumerate(m.segs.get("PRD", ()), 1):
        role_code = m.get(prd, 1).upper()
        if not role_code:
            raise _ae("PRD", 1, 101, "PRD-1: provider role is required", sequence=seq)
        what = mapping.provider_roles.get(role_code)
        if what is None:
            raise _ae("PRD", 1, 103, "PRD-1: provider role not in the referral map", sequence=seq)
        if what == "ignore":
            continue
        if to is not None:
            raise _ae("PRD", None, 100, "PRD: one referred-to provider per referral", sequence=seq)
        code = m.get(prd, 7) or m.get(prd, 4)
        if not code:
            raise _ae("PRD", 7, 101, "PRD-7: referred-to provider HSA-id is required", sequence=seq)
        unit = _resolve_unit(code, mapping)
        if unit is None:
            raise _ae(
                "PRD",
                7,
                102,
                "PRD-7: referred-to provider id is not an HSA-id",
                sequence=seq,
                component=1,
            )
        to = CareParty(role, unit[0], m.get(prd, 2) or unit[1])
    if to is None:
        raise _ae("PRD", None, 100, "PRD: a referred-to provider (PRD-1 RT) is required")
    authored = m.get(rf1, 7)
    reasons = (
        m.get(rf1, 10, 2, rep=rep) or m.get(rf1, 10, rep=rep)
        for rep in range(1, m.reps(rf1, 10) + 1)
    )
    return Referral(
        to=to,
        type_code=type_code,
        type_text=m.get(rf1, 3, 2),
        reason="; ".join(r for r in reasons if r),
        priority=priority,
        identifier=m.get(rf1, 6),
        authored_at=_ts(authored, ("RF1", 1, 7)) if authored else None,
    )


# --------------------------------------------------------------------------- the mapping


def _map(
    m: _Msg,
    header: MshHeader,
    facility: str,
    sent_at: str,
    rule: EventRule,
    mapping: TakeCareMapping,
    lus_marker: str = "optional",
) -> CanonicalMessage:
    """Message -> canonical message; see docs/mapping-guide.md for the field tables."""
    for name in mapping.spec_for(header.message_type).required:
        if m.first(name) is None:
            raise _ae(name, None, 100, f"{name} segment is required")
    if not facility:
        raise _ae("MSH", 4, 101, "MSH-4: sending facility is required")
    pid, pv1 = m.first("PID"), m.first("PV1")
    evn, pv2, pd1 = m.first("EVN"), m.first("PV2"), m.first("PD1")
    for name in ("PID", "MRG"):
        if "MRG" in m.segs and len(m.segs.get(name, ())) > 1:
            raise _ae(name, None, 100, f"{name}: one merge per message", sequence=2)

    patient_ids = _identifiers(m, pid, "PID", 3, mapping)
    event = _resolve_event(m, rule)
    for seg_name, num in mapping.required_fields.get(event, ()):
        if not m.get(m.first(seg_name), num):
            raise _ae(seg_name, num, 101, f"{seg_name}-{num}: required for {event.value}")

    recorded = m.get(evn, 2)
    if recorded:
        occurred_at = _ts(recorded, ("EVN", 1, 2))
    else:
        if not sent_at:
            raise _ae("MSH", 7, 101, "MSH-7: message date/time is required when EVN-2 is empty")
        occurred_at = _ts(sent_at, ("MSH", 1, 7))

    sender = _resolve_unit(facility, mapping) or (facility, "")  # an unmapped code kept as sent
    family, given = _name(m, pid) if pid is not None else ("", "")

    birth_raw = m.get(pid, 7)
    birth_date = _birth_date(birth_raw) if birth_raw else ""
    if birth_date is None:
        raise _ae("PID", 7, 102, "PID-7: not a valid date of birth")

    sex = m.get(pid, 8).upper()
    gender = mapping.gender.get(sex) if sex else "unknown"
    if gender is None:
        raise _ae("PID", 8, 103, "PID-8: administrative sex not in HL7 table 0001")

    pclass = m.get(pv1, 2).upper()
    encounter_class = mapping.patient_class.get(pclass) if pclass else "IMP"
    if encounter_class is None:
        raise _ae("PV1", 2, 103, "PV1-2: patient class not in HL7 table 0004")

    ward = m.get(pv1, 3)
    # A local ward code (no HSA-id, not in facilities.toml) is accepted and kept as sent;
    # whatever needs the ward's HSA-id falls back to the sender (unmapped_codes lists it).
    ward_unit = (_resolve_unit(ward, mapping) if ward else None) or ("", "")

    admitted = m.get(pv1, 44)
    expected = m.get(pv2, 9)
    discharged_text = m.get(pv1, 45)
    discharged = _ts(discharged_text, ("PV1", 1, 45)) if discharged_text else None
    disposition_code = m.get(pv1, 36).upper()
    disposition = mapping.discharge_disposition.get(disposition_code) if disposition_code else ""
    if disposition is None:
        raise _ae("PV1", 36, 103, "PV1-36: discharge disposition not in the disposition map")
    status = rule.encounter_status or (
        "finished" if discharged else "in-progress" if pv1 is not None else "unknown"
    )
    if status != "finished":
        discharged = None  # a cancellation: the discharge PV1-45 names is being undone
    ready_at = None
    for seg_name, num in rule.ready_at:
        value = m.get(m.first(seg_name), num)
        if value:
            ready_at = _ts(value, (seg_name, 1, num))
            break

    care_parties = _care_parties(m, mapping)
    referral = _referral(m, mapping)
    if referral is not None and referral.to not in care_parties:
        care_parties.append(referral.to)
    mrg = m.first("MRG")
    return CanonicalMessage(
        event=event,
        occurred_at=occurred_at,
        sender_hsa_id=sender[0],
        sender_name=sender[1],
        patient_ids=patient_ids,
        family=family,
        given=given,
        birth_date=birth_date,
        gender=gender,
        protected_identity=_protected(m, mapping),
        encounter_id=m.get(pv1, 19),
        encounter_class=encounter_class,
        admitted_at=_ts(admitted, ("PV1", 1, 44)) if admitted else None,
        expected_discharge=_ts(expected, ("PV2", 1, 9)) if expected else None,
        ward_hsa_id=ward_unit[0],
        ward_code="" if ward_unit[0] else ward,
        listed_clinic=_listed_clinic(m, pd1, mapping),
        care_parties=care_parties,
        consent=_consent(m, mapping),
        encounter_status=status,
        discharged_at=discharged,
        discharge_disposition=disposition,
        ready_at=ready_at,
        replaces_ids=_identifiers(m, mrg, "MRG", 1, mapping) if mrg is not None else [],
        diagnoses=_diagnoses(m, mapping),
        medications=_medications(m, mapping),
        documents=_documents(m, mapping),
        referral=referral,
        lus_needs=(
            _lus_needs(m, mapping, lus_marker)
            if "ZLU" in mapping.spec_for(header.message_type).read
            else None  # a merge or a referral: no stay of its own to judge
        ),
        address=_address(m, pid),
    )
