"""``brygga demo``: TakeCare admits a patient; home care reads and acknowledges the notice.

Uses only the gateway's public interfaces (MLLP on the wire, the HTTP API), as an outside
system would, so it proves the installation rather than the code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from gateway.api.auth import TokenKeys
from gateway.clock import STOCKHOLM
from gateway.settings import Settings

HOSPITAL = "SE2321000016-H001"
HOME_CARE = "SE5566778899-HT01"
OPS = "SE2321000016-OPS1"
START, END = b"\x0b", b"\x1c\r"


def admission(
    control_id: str,
    now: datetime,
    *,
    pnr: str = "191212121212",
    family: str = "Tolvansson",
    given: str = "Tolvan",
    consent: str = "samtycke",
    version: str = "2.5",
    lus_needs: str = "",
) -> bytes:
    """A realistic TakeCare admission (ADT^A01); by default of the test patient Tolvan
    Tolvansson (Skatteverket's published test personnummer). ``lus_needs``: a ZLU-2 code
    (mappings/takecare/adt.toml [lus_needs]); empty: no ZLU segment."""
    ts = now.strftime("%Y%m%d%H%M%S")
    zsc = [f"ZSC|1|{consent}|{ts}|SE2321000016-L123"] if consent else []
    segments = [
        f"MSH|^~\\&|TAKECARE|{HOSPITAL}|BRYGGA|SLL|{ts}||ADT^A01^ADT_A01|{control_id}|P|{version}"
        "|||||SWE|UNICODE UTF-8",
        f"EVN|A01|{ts}",
        f"PID|1||{pnr}^^^^PNR||{family}^{given}^^^^^L||{pnr[:8]}|M|||"
        "Storgatan 1^^Stockholm^^11122^SWE",
        "PD1|||Vårdcentral Skärholmen^^^^^^^^^SE2321000016-V010",
        f"PV1|1|I|{HOSPITAL}^51^1||||||||||||||||V{control_id}|||||||||||||||||||||||||{ts}",
        f"PV2|||||||||{now.strftime('%Y%m%d')}",
        "ROL|1|AD|HEMTJANST|SE5566778899-HT01^Omsorgshuset Hemtjänst AB",
        "ROL|2|AD|NATTPATRULL|SE5561234567-HT02^Nattpatrullen Söder",
        "ROL|3|AD|BISTAND|SE2120001637-B020^Biståndsenheten Skärholmen",
        *zsc,
        *([f"ZLU|1|{lus_needs}"] if lus_needs else []),
    ]
    return "\r".join(segments).encode("utf-8") + b"\r"


async def send_mllp(host: str, port: int, message: bytes, timeout: float) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(START + message + END)
        await writer.drain()
        frame = await asyncio.wait_for(reader.readuntil(END), timeout)
        return frame.strip(START).removesuffix(END)
    finally:
        writer.close()


def msa(ack: bytes) -> list[str]:
    for segment in ack.decode("utf-8", "replace").split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")
    raise ValueError("the answer has no MSA segment")


async def _until(step: str, timeout: float, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo step timed out: {step}")
        await asyncio.sleep(0.2)


async def play(
    settings: Settings, host: str, timeout: float, say: Callable[[str], None]
) -> dict[str, Any]:
    keys = TokenKeys.from_dir(settings.keys_dir, create=False)
    staff = {
        "Authorization": "Bearer "
        + keys.issue(HOME_CARE, "staff", "Anna Svensson", "Undersköterska")
    }
    ops = {"Authorization": "Bearer " + keys.issue(OPS, "ops", "Driftövervakning")}
    control_id = f"DEMO{int(time.time() * 1000)}"
    now = datetime.now(STOCKHOLM)

    say(
        f"1. TakeCare sends an admission (ADT^A01, MSH-10 {control_id}) over MLLP "
        f"to {host}:{settings.mllp_port}"
    )
    ack = await send_mllp(host, settings.mllp_port, admission(control_id, now), timeout)
    fields = msa(ack)
    say(f"   ACK: MSA-1 {fields[1]}, MSA-2 {fields[2]}")
    if fields[1] not in ("AA", "CA"):
        raise RuntimeError(f"the gateway refused the admission: {fields[3:]}")

    base = f"http://{host}:{settings.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as http:
        ids = (
            (await http.get("/api/v1/messages", params={"control_id": control_id}, headers=ops))
            .raise_for_status()
            .json()["ids"]
        )
        message_id = ids[0]

        async def in_inbox() -> dict[str, Any] | None:
            items = (await http.get("/api/v1/inbox", headers=staff)).raise_for_status().json()
            return next((i for i in items if i["message_id"] == message_id), None)

        say("2. Home care (Omsorgshuset Hemtjänst AB) waits for the notice in its inbox")
        notice = await _until("notice in the home-care inbox", timeout, in_inbox)
        say(f"   {notice['event_display']} for {notice['patient']['name']} has arrived")
        say("3. Anna Svensson opens it (read) and acknowledges it (kvittens)")
        (await http.get(f"/api/v1/inbox/{notice['id']}", headers=staff)).raise_for_status()
        (
            await http.post(
                f"/api/v1/inbox/{notice['id']}/acknowledge",
                headers=staff,
            )
        ).raise_for_status()

        async def all_delivered() -> dict[str, Any] | None:
            ledger = (
                (await http.get(f"/api/v1/messages/{message_id}", headers=ops))
                .raise_for_status()
                .json()
            )
            done = ledger["deliveries"] and all(
                d["state"] != "routed" for d in ledger["deliveries"]
            )
            return ledger if done else None

        say("4. The receipt ledger, per recipient:")
        ledger: dict[str, Any] = await _until("every delivery made", timeout, all_delivered)
        return ledger
