"""The FHIR messaging channel: ``POST {address}/$process-message`` with the canonical Bundle.

The recipient's server answers with a response message (MessageHeader.response ``ok``,
``transient-error`` or ``fatal-error``), or with 202 and a response message later, which it
posts to the gateway's own ``POST /fhir/$process-message``. Bundle.id and MessageHeader.id
are the delivery's dedup key on every resend, so the receiver shows a resend once.

Details and exception texts are for operations staff: they carry HTTP statuses, FHIR codes
and the receiver's text with every trace of the patient masked, never the payload.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.model.identifiers import HSA_SYSTEM
from gateway.pipeline.channel_text import issue_text
from gateway.pipeline.channels import (
    ChannelRejected,
    ChannelUnavailable,
    DeliveryContext,
    Outcome,
)
from gateway.pipeline.ledger import State

FHIR_JSON = "application/fhir+json"
_RETRY_LATER = frozenset({408, 429})


class FhirChannelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BRYGGA_FHIR_CHANNEL_", extra="ignore")

    timeout_seconds: float = 10.0


def outgoing_bundle(ctx: DeliveryContext) -> dict[str, Any]:
    """A copy of the canonical Bundle addressed to this recipient, with the dedup key as
    Bundle.id and MessageHeader.id."""
    bundle: dict[str, Any] = orjson.loads(orjson.dumps(ctx.bundle))
    bundle["id"] = ctx.dedup_key
    header = message_header(bundle)
    if header is None:
        raise ChannelRejected("Meddelandet saknar MessageHeader och kan inte skickas som FHIR")
    header["id"] = ctx.dedup_key
    header["destination"] = [
        {
            "endpoint": ctx.address,
            "receiver": {"identifier": {"system": HSA_SYSTEM, "value": ctx.recipient_hsa_id}},
        }
    ]
    return bundle


def message_header(bundle: Any) -> dict[str, Any] | None:
    """The MessageHeader of a message Bundle (its first entry, by the rules), or None."""
    if not isinstance(bundle, dict):
        return None
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "MessageHeader":
            return resource
    return None


class FhirMessagingChannel:
    name = "fhir"
    protected_identity = True  # a FHIR server of the recipient's own, over TLS
    application_receipts = True

    def __init__(
        self,
        settings: FhirChannelSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings or FhirChannelSettings()
        self._transport = transport
        self._clients: dict[int, httpx.AsyncClient] = {}  # one per event loop

    def _client(self) -> httpx.AsyncClient:
        loop = id(asyncio.get_running_loop())
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(
                timeout=self.settings.timeout_seconds, transport=self._transport
            )
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        if not ctx.address:
            raise ChannelUnavailable("Ingen FHIR-adress för mottagaren i katalogen")
        body = orjson.dumps(outgoing_bundle(ctx))
        url = ctx.address.rstrip("/") + "/$process-message"
        try:
            response = await self._client().post(
                url, content=body, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
            )
        except httpx.TimeoutException:
            raise ChannelUnavailable(
                f"FHIR-mottagaren svarade inte inom {self.settings.timeout_seconds:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ChannelUnavailable(
                f"Kunde inte nå FHIR-mottagaren ({type(exc).__name__})"
            ) from None
        return self._outcome(response, ctx)

    def _outcome(self, response: httpx.Response, ctx: DeliveryContext) -> Outcome:
        status = response.status_code
        try:
            answer: Any = response.json() if response.content else None
        except ValueError:
            answer = None
        if status == 202:
            return Outcome(State.DELIVERED, "Mottaget av mottagarens FHIR-server; kvittens väntas")
        if status >= 500 or status in _RETRY_LATER:
            raise ChannelUnavailable(f"FHIR-mottagaren svarade HTTP {status}; skickas igen")
        if 400 <= status < 500:
            why = issue_text(answer, ctx.bundle)
            raise ChannelRejected(
                f"FHIR-mottagaren avvisade meddelandet: HTTP {status}"
                + (f" ({why})" if why else "")
            )
        if status not in (200, 201):
            raise ChannelUnavailable(f"Oväntat svar från FHIR-mottagaren: HTTP {status}")
        header = message_header(answer)
        response_part = (header or {}).get("response")
        if not isinstance(response_part, dict):
            return Outcome(
                State.DELIVERED,
                f"Mottaget av mottagarens FHIR-server (HTTP {status}), utan kvittens",
            )
        if response_part.get("identifier") not in (None, ctx.dedup_key):
            return Outcome(
                State.DELIVERED, "Mottaget; svaret gällde ett annat meddelande och räknas inte"
            )
        code = response_part.get("code")
        if code == "ok":
            return Outcome(State.RECEIVED, "Mottagarens system tog emot meddelandet (FHIR ok)")
        why = issue_text(answer, ctx.bundle)
        suffix = f": {why}" if why else ""
        if code == "transient-error":
            raise ChannelUnavailable(f"Mottagarens system har ett tillfälligt fel{suffix}")
        if code == "fatal-error":
            raise ChannelRejected(f"Mottagarens system avvisade meddelandet{suffix}")
        return Outcome(
            State.DELIVERED, "Mottaget av mottagarens FHIR-server; okänd svarskod i kvittensen"
        )
