"""The HL7 v2 channel: the Bundle rendered as HL7 v2.5 (mappings/hl7v2/outbound.toml), sent
over MLLP to ``host:port``, answered by an ACK on the same connection (original mode).

MSH-10 is derived from the delivery's dedup key (20 characters, the version's limit), the
same on every resend, so the receiver recognises a resend. MSA-1 AA/CA: the application took
it (RECEIVED). AE/CE: it refused this message (rejected; the next channel is tried). AR/CR,
no answer, a refused connection or a timeout: unavailable, resent later. Details carry ACK
codes and the receiver's text with every trace of the patient masked.
"""

from __future__ import annotations

import asyncio

from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.hl7v2.render import render, stable_control_id
from adapters.takecare.ack import parse_ack
from adapters.takecare.mllp import send
from gateway.pipeline.channel_text import outside_text
from gateway.pipeline.channels import (
    ChannelRejected,
    ChannelUnavailable,
    DeliveryContext,
    Outcome,
)
from gateway.pipeline.ledger import State


class Hl7v2ChannelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRYGGA_HL7V2_CHANNEL_", extra="ignore")

    timeout_seconds: float = 10.0


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:2575`` for IPv6) -> (host, port); ValueError if it is not."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("address must be host:port")
    return host.strip("[]"), int(port)


class Hl7v2MllpChannel:
    name = "hl7v2"
    protected_identity = True  # a system of the recipient's own
    application_receipts = True

    def __init__(self, settings: Hl7v2ChannelSettings | None = None) -> None:
        self.settings = settings or Hl7v2ChannelSettings()

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        try:
            host, port = parse_address(ctx.address)
        except ValueError:
            raise ChannelUnavailable(
                "Ingen giltig HL7-adress (värd:port) för mottagaren i katalogen"
            ) from None
        message = render(ctx.bundle, ctx.dedup_key, ctx.recipient_hsa_id).encode("utf-8")
        timeout = self.settings.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                ack = (await send(host, port, [message], timeout))[0]
        except TimeoutError:
            raise ChannelUnavailable(f"HL7-mottagaren svarade inte inom {timeout:g} s") from None
        except OSError as exc:
            raise ChannelUnavailable(
                f"Kunde inte nå HL7-mottagaren ({type(exc).__name__})"
            ) from None
        try:
            code, control_id, _location, text = parse_ack(ack)
        except Exception:  # hl7 raises several kinds on what is not an ACK
            raise ChannelUnavailable(
                "HL7-mottagaren svarade med något som inte är en ACK"
            ) from None
        why = outside_text(text, ctx.bundle)
        suffix = f": {why}" if why else ""
        if control_id and control_id != stable_control_id(ctx.dedup_key):
            raise ChannelUnavailable("HL7-mottagarens ACK gällde ett annat meddelande (MSA-2)")
        if code in ("AA", "CA"):
            return Outcome(State.RECEIVED, f"Mottagarens system tog emot meddelandet (HL7 {code})")
        if code in ("AE", "CE"):
            raise ChannelRejected(f"Mottagarens system avvisade meddelandet (HL7 {code}){suffix}")
        if code in ("AR", "CR"):
            raise ChannelUnavailable(
                f"Mottagarens system kunde inte ta emot nu (HL7 {code}){suffix}"
            )
        raise ChannelUnavailable("HL7-mottagaren svarade med en okänd ACK-kod")
