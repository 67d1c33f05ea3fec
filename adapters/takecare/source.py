"""TakeCare's inbound feed: HL7 v2 over MLLP into the gateway's intake.

The ACK is the contract with the sender: positive only after the message is committed
(original mode AA, enhanced mode CA), negative with the segment and field when the message
is wrong (AE/AR), and AE/CE "store failed, resend" when the database could not commit.
Enhanced mode follows MSH-15: no accept ACK the sender did not ask for, so with MSH-16
asking for the application ACK the sender gets exactly one (see receipts.py).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from concurrent.futures import ThreadPoolExecutor

import structlog

from adapters.takecare import mllp
from adapters.takecare.ack import build_ack
from adapters.takecare.hl7in import (
    Hl7Rejection,
    Inbound,
    MshHeader,
    parse,
    read_header,
    unmapped_codes,
)
from gateway import clock
from gateway.logs import error_fields
from gateway.pipeline.intake import Intake
from gateway.sources import SourceContext
from gateway.store import unmapped

log = structlog.get_logger("brygga.takecare")
SYSTEM_ERROR = "Message could not be stored; nothing was kept. Resend it."
REFUSALS = {  # (HL7 table 0357 code, text) per reason mllp.serve refuses a frame
    "too_large": (207, "Message larger than this gateway accepts; nothing was kept."),
    "busy": (207, "Gateway busy with other large messages; nothing was kept. Resend later."),
    "slow": (207, "Message took too long to read; nothing was kept."),
}


def refusal(head: bytes, reason: str) -> bytes | None:
    """The AR for a frame refused unread (``head``: its first bytes); None without MSH."""
    header = read_header(head)
    if not header.control_id:
        return None
    code, text = REFUSALS[reason]
    rejection = Hl7Rejection("AR", "MSH", 1, None, None, code, text, header=header)
    return build_ack(header, _answer_code("AR", header) or "AR", error=rejection)


def _enhanced(header: MshHeader) -> bool:
    """Enhanced acknowledgement mode: MSH-15 or MSH-16 is valued (HL7 v2 chapter 2)."""
    return bool(header.accept_ack_type or header.application_ack_type)


_COMMIT_LEVEL = {"AA": "CA", "AE": "CE", "AR": "CR"}


def _answer_code(code: str, header: MshHeader) -> str | None:
    """The ACK code on the connection for an outcome (AA, AE or AR); None: no answer.

    Original mode answers AA/AE/AR. Enhanced mode answers at the accept level, CA/CE/CR,
    when MSH-15 asks for it (AL or empty: always, SU: success, ER: errors, NE: never).
    An error the sender asked no accept ACK for is still answered, with AE/AR (the
    message will not be processed: that is its application ACK); a success is not, and
    the application ACK follows on its own when MSH-16 asks for it.
    """
    if not _enhanced(header):
        return code
    ok = code == "AA"
    wanted = header.accept_ack_type
    if wanted == "NE" or (wanted == "SU" and not ok) or (wanted == "ER" and ok):
        return None if ok else code
    return _COMMIT_LEVEL[code]


class TakeCareSource:
    name = "takecare-mllp"

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._intake: Intake | None = None
        self._source_override = ""
        self._inline_max = 64 * 1024
        self._parse_timeout = 10.0
        self._default_sender = ""  # stands in for an empty MSH-4 (BRYGGA_TAKECARE_SENDER)
        self._lus_marker = "optional"  # BRYGGA_TAKECARE_LUS_MARKER (decision 0017)
        # Large messages are parsed here, off the event loop; two threads bound the work.
        self._parser = ThreadPoolExecutor(2, thread_name_prefix="hl7-parse")

    async def start(self, ctx: SourceContext) -> None:
        self._intake = ctx.intake
        self._source_override = ctx.settings.source_system
        settings = ctx.settings
        self._inline_max = settings.mllp_parse_inline_max
        self._parse_timeout = settings.mllp_parse_timeout
        self._default_sender = settings.takecare_sender
        self._lus_marker = settings.takecare_lus_marker
        tls = settings.mllp_ssl_context()
        self._server = await mllp.serve(
            settings.mllp_host,
            settings.mllp_port,
            self.handle,
            idle_timeout=settings.mllp_idle_timeout,
            frame_timeout=settings.mllp_frame_timeout,
            max_frame=settings.mllp_max_frame,
            max_pending=settings.mllp_max_pending,
            max_connections=settings.mllp_max_connections,
            refuse=refusal,
            ssl=tls,
        )
        log.info(
            "takecare.listening",
            port=ctx.settings.mllp_port,
            tls=tls is not None,
            client_certificates=bool(tls and tls.verify_mode == ssl.CERT_REQUIRED),
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._parser.shutdown(wait=False, cancel_futures=True)

    async def _parse(self, raw: bytes) -> Inbound:
        """parse(), off the event loop for large messages and within the time budget."""
        work_of = functools.partial(
            parse, raw, default_sender=self._default_sender, lus_marker=self._lus_marker
        )
        if len(raw) <= self._inline_max:
            return work_of()
        work = asyncio.get_running_loop().run_in_executor(self._parser, work_of)
        try:
            return await asyncio.wait_for(work, self._parse_timeout)
        except TimeoutError:
            log.warning("takecare.parse_timeout", size=len(raw), seconds=self._parse_timeout)
            code, text = REFUSALS["slow"]
            header = read_header(raw[: mllp.HEAD])
            raise Hl7Rejection("AR", "MSH", 1, None, None, code, text, header=header) from None

    async def handle(self, raw: bytes) -> bytes:
        """One inbound frame in, its ACK out (b"" when the sender asked for none)."""
        try:
            inbound = await self._parse(raw)
        except Hl7Rejection as rejection:
            # Enhanced mode answers at the accept level: AR/AE become CR/CE.
            code = _answer_code(rejection.ack_code, rejection.header) or rejection.ack_code
            log.info(
                "takecare.rejected",
                ack=code,
                segment=rejection.segment,
                field=rejection.field,
                code=rejection.hl7_error_code,
            )
            return build_ack(rejection, code, error=rejection, text=rejection.text)
        accepted_code = _answer_code("AA", inbound)
        source = (
            self._source_override or f"{inbound.sending_application}|{inbound.sending_facility}"
        )
        assert self._intake is not None
        try:
            accepted = await self._intake.accept(
                source=source,
                control_id=inbound.control_id,
                raw=raw,
                message=inbound.canonical,
                answer=lambda _message_id: (
                    build_ack(inbound, accepted_code) if accepted_code else b""
                ),
            )
        except Exception as exc:
            log.error("takecare.store_failed", control_id=inbound.control_id, **error_fields(exc))
            failure = Hl7Rejection(
                ack_code=_answer_code("AE", inbound) or "AE",
                segment="MSH",
                sequence=1,
                field=None,
                component=None,
                hl7_error_code=207,
                text=SYSTEM_ERROR,
            )
            return build_ack(inbound, failure.ack_code, error=failure, text=SYSTEM_ERROR)
        found = unmapped_codes(inbound.canonical)
        if found and not accepted.duplicate:
            await self._note_unmapped(inbound.canonical.sender_hsa_id, found)
        return accepted.answer

    async def _note_unmapped(self, sender: str, found: list[tuple[str, str]]) -> None:
        """Count the unit codes the mapping does not know, for operators to map; after the
        commit, so a failure here costs only a count, never the message or its ACK."""
        assert self._intake is not None
        try:
            async with self._intake.db.transaction() as conn:
                await unmapped.record(conn, sender, found, clock.now())
        except Exception as exc:
            log.warning("takecare.unmapped_not_recorded", **error_fields(exc))
