"""TakeCare HL7 v2 inbound: raw bytes -> :class:`Inbound` (header + canonical message).

Every message ends as an :class:`Inbound` or an :class:`Hl7Rejection` that names segment,
field and HL7 error code, so the ACK can tell the sender exactly what to fix. Rejection
texts are fixed templates: a field's value (patient data) never reaches an exception, a
log line or an ACK. Parsing uses the `hl7` package (hl7apy is ~25x slower); code maps are
data in ``mappings/takecare/*.toml``, read once at import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tomllib
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import hl7
import structlog

from gateway.model.bundle import CanonicalMessage, CareParty, ConsentBasis
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
from mappings import MAPPINGS_DIR

__all__ = [
    "MAPPING",
    "Hl7Rejection",
    "Inbound",
    "MshHeader",
    "TakeCareMapping",
    "codec_for",
    "load_mapping",
    "parse",
]

STOCKHOLM = ZoneInfo("Europe/Stockholm")
log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class MshHeader:
    """What MSH said, as far as it could be read: enough to address an ACK."""

    control_id: str = ""
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


# --------------------------------------------------------------------------- mapping data


@dataclass(frozen=True, slots=True)
class ProtectedRule:
    segment: str
    field: int
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class TakeCareMapping:
    """The code maps of ``mappings/takecare/``, validated when loaded."""

    versions: frozenset[str]
    events: dict[str, LusEvent]
    charsets: dict[str, str]
    authorities: dict[str, IdentifierKind]
    type_codes: dict[str, IdentifierKind]
    gender: dict[str, str]
    patient_class: dict[str, str]
    roles: dict[str, str]
    consent_basis: dict[str, str]
    protected: tuple[ProtectedRule, ...]
    facilities: dict[str, tuple[str, str]]  # code -> (hsa_id, name)
    segments: frozenset[str] = frozenset()  # read by the mapping: all hl7.parse is given


_MAPPED_SEGMENTS = frozenset({"EVN", "PID", "PD1", "PV1", "PV2", "ROL", "ZSC"})
_GENDERS = {"male", "female", "other", "unknown"}
_BASES = {"samtycke", "menprovning", "sparr"}


def _upper_keys(table: dict[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in table.items()}


def load_mapping(directory: Path = MAPPINGS_DIR / "takecare") -> TakeCareMapping:
    """Read and check ``adt.toml`` and ``facilities.toml``; a bad entry fails at start-up."""
    adt = tomllib.loads((directory / "adt.toml").read_text("utf-8"))
    fac_path = directory / "facilities.toml"
    fac = tomllib.loads(fac_path.read_text("utf-8")) if fac_path.exists() else {}
    kinds = {k.value: k for k in IdentifierKind}
    pid3 = adt.get("pid3", {})
    mapping = TakeCareMapping(
        versions=frozenset(adt["msh"]["versions"]),
        events={k.upper(): LusEvent(v) for k, v in adt["events"].items()},
        charsets=_upper_keys(adt["charsets"]),
        authorities={k: kinds[v] for k, v in pid3.get("authorities", {}).items()},
        type_codes={k.upper(): kinds[v] for k, v in pid3.get("type_codes", {}).items()},
        gender=_upper_keys(adt["gender"]),
        patient_class=_upper_keys(adt["patient_class"]),
        roles=_upper_keys(adt["roles"]),
        consent_basis=_upper_keys(adt["consent_basis"]),
        protected=tuple(
            ProtectedRule(r["segment"], int(r["field"]), frozenset(v.upper() for v in r["values"]))
            for r in adt.get("protected_identity", [])
        ),
        facilities={
            code: (entry["hsa_id"], entry.get("name", ""))
            for code, entry in fac.get("facilities", {}).items()
        },
    )
    segments = _MAPPED_SEGMENTS | {rule.segment for rule in mapping.protected}
    mapping = dataclasses.replace(mapping, segments=segments)
    for codec in mapping.charsets.values():
        "".encode(codec)  # LookupError for an unknown codec name
    bad = (
        set(mapping.gender.values()) - _GENDERS
        or set(mapping.consent_basis.values()) - _BASES
        or {h for h, _ in mapping.facilities.values() if not is_hsa_id(h)}
    )
    if bad:
        raise ValueError(f"mappings/takecare: invalid target values {sorted(bad)}")
    return mapping


MAPPING = load_mapping()


def codec_for(charset: str, mapping: TakeCareMapping = MAPPING) -> str:
    """The Python codec for an MSH-18 value ("" -> UTF-8); UTF-8 when unknown."""
    return mapping.charsets.get(charset.upper(), "utf-8")


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


def _unescape(value: str, enc: _Enc) -> str:
    """HL7 escape sequences (2.7 in chapter 2). Own code, not hl7's: that one logs values."""
    esc = enc.esc
    if esc not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        j = value.find(esc, i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        k = value.find(esc, j + 1)
        if k < 0:  # unterminated: keep literally
            out.append(value[j:])
            break
        seq, i = value[j + 1 : k], k + 1
        simple = {"F": enc.field, "S": enc.comp, "R": enc.rep, "T": enc.sub, "E": esc}
        if seq in simple:
            out.append(simple[seq])
        elif seq[:1] == "X" and len(seq) % 2 == 1:
            with contextlib.suppress(ValueError):  # not hex: dropped like unknown escapes
                out.append(bytes.fromhex(seq[1:]).decode(enc.codec, "replace"))
        elif seq in (".br", ".sp", ".ce"):
            out.append(" ")
        # highlighting (H, N), other formatting and unknown sequences are dropped
    return "".join(out)


def _leaf(node: Any, rep: int, comp: int, sub: int) -> str:
    """Component ``rep/comp/sub`` (1-based) of an hl7 field; "" when absent."""
    for idx in (rep, comp, sub):
        if isinstance(node, str):
            return node if idx == 1 else ""
        if idx > len(node):
            return ""
        node = node[idx - 1]
    return node if isinstance(node, str) else ""


def _as_message(sequence: list[Any], **_: Any) -> list[Any]:
    return sequence


def _as_segment(sequence: list[Any], **_: Any) -> list[Any]:
    return sequence


def _as_part(sequence: list[Any], **_: Any) -> list[Any]:
    return sequence


class _ListFactory(hl7.Factory):  # type: ignore[misc]
    """hl7.parse builds plain nested lists: half the cost of its container classes.

    The message and segment builders must be distinct functions: hl7's splitter recognises
    the MSH level by comparing them.
    """

    create_message = staticmethod(_as_message)
    create_segment = staticmethod(_as_segment)
    create_field = create_repetition = create_component = staticmethod(_as_part)


class _Msg:
    """Segment index and typed field access over one parsed message (nested lists)."""

    __slots__ = ("enc", "segs")

    def __init__(self, msg: list[Any], enc: _Enc) -> None:
        self.enc = enc
        self.segs: dict[str, list[Any]] = {}
        for seg in msg:
            name = seg[0] if isinstance(seg[0], str) else seg[0][0]  # a bare "ZSC" stays flat
            self.segs.setdefault(name, []).append(seg)

    def first(self, name: str) -> Any | None:
        found = self.segs.get(name)
        return found[0] if found else None

    def reps(self, seg: Any, field: int) -> int:
        """How many repetitions the field has (0 when absent)."""
        if seg is None or field >= len(seg):
            return 0
        node = seg[field]
        return 1 if isinstance(node, str) else len(node)

    def get(self, seg: Any, field: int, comp: int = 1, sub: int = 1, rep: int = 1) -> str:
        if seg is None or field >= len(seg):
            return ""
        return _unescape(_leaf(seg[field], rep, comp, sub), self.enc).strip()


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
    )


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
    for line in lines[1:]:
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


def parse(raw: bytes, *, mapping: TakeCareMapping = MAPPING) -> Inbound:
    """Parse and map one HL7 v2 message; raises :class:`Hl7Rejection` and nothing else."""
    header = EMPTY_HEADER
    try:
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
        lines = _split_segments(text)
        fields = _field_list(lines[0])
        enc = _enc_of(fields, codec or "utf-8")
        header = _read_header(fields, enc, charset)
        if codec is None:
            raise _ar("MSH", 18, 103, "MSH-18: character set not supported")
        if not _valid_encoding_chars(fields):
            raise _ar("MSH", 2, 102, "MSH-2: encoding characters are not valid")
        event = _check_msh(header, mapping)
        _check_segments(lines, enc.field)
        # hl7.parse costs per node: give it the delimiters of MSH and the mapped segments only
        head = lines[0][: lines[0].find(enc.field, 4) + 1]
        wanted = [line for line in lines[1:] if line[:3] in mapping.segments]
        try:
            msg = _Msg(hl7.parse("\r".join([head, *wanted]), factory=_ListFactory), enc)
        except Exception:
            raise _ar("MSH", None, 100, "message structure could not be parsed") from None
        sent_at = _unescape(fields[7].split(enc.comp, 1)[0], enc).strip() if len(fields) > 7 else ""
        canonical = _map(msg, header, sent_at, event, mapping)
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


def _check_msh(header: MshHeader, mapping: TakeCareMapping) -> LusEvent:
    if not header.control_id:
        raise _ar("MSH", 10, 101, "MSH-10: message control id is required")
    if not header.version:
        raise _ar("MSH", 12, 101, "MSH-12: version id is required")
    if header.version not in mapping.versions:
        raise _ar("MSH", 12, 203, "MSH-12: version not supported (2.3 to 2.5.1 are)")
    if not header.message_type:
        raise _ar("MSH", 9, 101, "MSH-9: message type is required")
    event = mapping.events.get(header.message_type)
    if event is not None:
        return event
    mtype = header.message_type.split("^", 1)[0]
    if any(key.split("^", 1)[0] == mtype for key in mapping.events):
        raise _ar("MSH", 9, 201, "MSH-9: trigger event not supported", component=2)
    raise _ar("MSH", 9, 200, "MSH-9: message type not supported", component=1)


def _resolve_unit(code: str, mapping: TakeCareMapping) -> tuple[str, str] | None:
    """A unit code -> (HSA-id, name): the facility map first, then an HSA-id as is."""
    if code in mapping.facilities:
        return mapping.facilities[code]
    if is_hsa_id(code):
        return code, ""
    return None


def _patient_ids(m: _Msg, pid: Any, mapping: TakeCareMapping) -> list[PatientId]:
    ids: list[PatientId] = []
    for rep in range(1, m.reps(pid, 3) + 1):
        value = m.get(pid, 3, 1, rep=rep)
        if not value:
            continue
        uid, ns = m.get(pid, 3, 4, 2, rep=rep), m.get(pid, 3, 4, 1, rep=rep)
        kind = (
            OID_KINDS.get(uid.removeprefix("urn:oid:"))
            or OID_KINDS.get(ns)
            or mapping.authorities.get(ns)
            or mapping.type_codes.get(m.get(pid, 3, 5, rep=rep).upper())
        )
        if kind is None:
            continue  # a foreign identifier (hospital MRN, other country): not ours to key on
        try:
            if kind is IdentifierKind.RESERVNUMMER:
                patient_id = parse_reservnummer(value)
            else:
                patient_id = parse_identity_number(value)
        except InvalidIdentifier as exc:
            raise _ae("PID", 3, 102, f"PID-3: {exc}", component=1, repetition=rep) from None
        if patient_id not in ids:
            ids.append(patient_id)
    if not ids:
        raise _ae(
            "PID",
            3,
            101,
            "PID-3: no Swedish patient identifier (personnummer, samordningsnummer or "
            "reservnummer)",
        )
    return ids


def _name(m: _Msg, pid: Any) -> tuple[str, str]:
    """PID-5: the legal name (XPN-7 'L') when marked, else the first; given + middle names."""
    chosen = 1
    for rep in range(1, m.reps(pid, 5) + 1):
        if m.get(pid, 5, 7, rep=rep).upper() == "L":
            chosen = rep
            break
    family = m.get(pid, 5, 1, 1, rep=chosen)
    given = " ".join(p for p in (m.get(pid, 5, 2, rep=chosen), m.get(pid, 5, 3, rep=chosen)) if p)
    return family, given


def _protected(m: _Msg, mapping: TakeCareMapping) -> bool:
    for rule in mapping.protected:
        seg = m.first(rule.segment)
        for rep in range(1, m.reps(seg, rule.field) + 1):
            if m.get(seg, rule.field, rep=rep).upper() in rule.values:
                return True
    return False


def _listed_clinic(m: _Msg, pd1: Any, mapping: TakeCareMapping) -> CareParty | None:
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
    parties: list[CareParty] = []
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
        party = CareParty(role, unit[0], m.get(rol, 4, 2, 1) or unit[1])
        if party not in parties:
            parties.append(party)
    return parties


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


def _map(
    m: _Msg, header: MshHeader, sent_at: str, event: LusEvent, mapping: TakeCareMapping
) -> CanonicalMessage:
    """ADT -> canonical message; see docs/mapping-guide.md for the field table."""
    pid, pv1 = m.first("PID"), m.first("PV1")
    if pid is None:
        raise _ae("PID", None, 100, "PID segment is required")
    if pv1 is None:
        raise _ae("PV1", None, 100, "PV1 segment is required")
    if not header.sending_facility:
        raise _ae("MSH", 4, 101, "MSH-4: sending facility is required")
    evn, pv2, pd1 = m.first("EVN"), m.first("PV2"), m.first("PD1")

    patient_ids = _patient_ids(m, pid, mapping)

    recorded = m.get(evn, 2)
    if recorded:
        occurred_at = _ts(recorded, ("EVN", 1, 2))
    else:
        if not sent_at:
            raise _ae("MSH", 7, 101, "MSH-7: message date/time is required when EVN-2 is empty")
        occurred_at = _ts(sent_at, ("MSH", 1, 7))

    sender = _resolve_unit(header.sending_facility, mapping) or (header.sending_facility, "")
    family, given = _name(m, pid)

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
    ward_unit = _resolve_unit(ward, mapping) if ward else ("", "")
    if ward_unit is None:
        raise _ae(
            "PV1",
            3,
            102,
            "PV1-3: point of care is not an HSA-id or a mapped unit code",
            component=1,
        )

    admitted = m.get(pv1, 44)
    expected = m.get(pv2, 9)
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
        listed_clinic=_listed_clinic(m, pd1, mapping),
        care_parties=_care_parties(m, mapping),
        consent=_consent(m, mapping),
    )
