"""Stand-ins for recipients with a system of their own, on real loopback sockets.

``FhirReceiver`` is a FHIR server with ``POST /$process-message`` (a Starlette app served by
uvicorn); ``MllpReceiver`` is an HL7 v2 system behind MLLP (an asyncio server). Each runs in
a background thread with its own event loop, so sync tests (beside a gateway process) and
async tests use them alike. Start one per recipient; flip the switches at any time::

    fhir = FhirReceiver().start()          # fhir.url -> directory address of channel "fhir"
    mllp = MllpReceiver().start()          # mllp.address -> "127.0.0.1:PORT" for "hl7v2"
    fhir.down = True                       # 503 from now on   (mllp: closes without ACK)
    fhir.reject = True                     # fatal-error       (mllp: AE)
    fhir.asynchronous = True               # 202, no receipt   (post one: response_bundle)
    fhir.delay = 2.0                       # answer after 2 s  (both; for timeouts)
    mllp.set(reject=True, reject_text="…") # several at once
    fhir.stop(); fhir.start()              # really away, then back on the same port
    len(fhir.received), len(fhir.shown)    # every post; distinct dedup keys
    fhir.reset()                           # forget what was received, switches off

What they record: ``received`` is every message that arrived (FHIR: the Bundle as JSON;
MLLP: the ER7 text), also while rejecting; ``shown`` maps each distinct dedup key (FHIR
Bundle.id, HL7 MSH-10) to the first message with it, in order: what a person at the
recipient would see, since the receiver shows a resend once. Nothing is recorded while
``down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from typing import Any

import hl7
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.takecare.mllp import Framer, frame
from gateway.bus.broker import free_port

FHIR_JSON = "application/fhir+json"
REJECT_TEXT = "Mottagaren känner inte till enheten"


def response_bundle(
    dedup_key: str,
    code: str = "ok",
    *,
    text: str = "",
    sender_hsa_id: str = "SE5566778899-HT01",
    event_code: str = "inskrivningsmeddelande",
) -> dict[str, Any]:
    """A FHIR response message about the message whose MessageHeader.id was ``dedup_key``
    (``ok``, ``transient-error`` or ``fatal-error``; ``text`` goes in an OperationOutcome).
    What a receiver answers at once, or posts later to the gateway's $process-message."""
    header_id = str(uuid.uuid4())
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": header_id,
        "eventCoding": {
            "system": "https://brygga.dev/fhir/CodeSystem/lus-event",
            "code": event_code,
        },
        "source": {"endpoint": "urn:standin:fhir"},
        "sender": {"identifier": {"system": "urn:oid:1.2.752.29.4.19", "value": sender_hsa_id}},
        "response": {"identifier": dedup_key, "code": code},
    }
    entries = [{"fullUrl": f"urn:uuid:{header_id}", "resource": header}]
    if text:
        header["response"]["details"] = {"reference": "OperationOutcome/why"}
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "OperationOutcome",
                    "id": "why",
                    "issue": [
                        {"severity": "error", "code": "processing", "details": {"text": text}}
                    ],
                },
            }
        )
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "message", "entry": entries}


class _Receiver:
    """What both stand-ins share: switches, records, and a port kept across restarts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.down = False
        self.reject = False
        self.reject_text = REJECT_TEXT
        self.delay = 0.0
        self.received: list[Any] = []
        self.shown: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """Forget what was received; every switch off."""
        with self._lock:
            self.received.clear()
            self.shown.clear()
        self.down = self.reject = False
        self.reject_text = REJECT_TEXT
        self.delay = 0.0

    def set(self, **switches: Any) -> Any:
        """Flip several switches at once (``rx.set(reject=True, reject_text="…")``)."""
        for name, value in switches.items():
            if name.startswith("_") or not hasattr(self, name) or name in ("received", "shown"):
                raise AttributeError(f"no switch {name!r}")
            setattr(self, name, value)
        return self

    def _record(self, key: str, message: Any) -> None:
        with self._lock:
            self.received.append(message)
            self.shown.setdefault(key, message)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FhirReceiver(_Receiver):
    """A recipient's FHIR server. ``url`` is its base (the directory address); it takes
    ``POST {url}/$process-message`` and answers a response message ``ok`` (200).

    Switches: ``down`` (503, nothing recorded), ``reject`` (200 with ``fatal-error`` and
    ``reject_text`` in an OperationOutcome), ``asynchronous`` (202: the receipt must be
    posted to the gateway later, see :func:`response_bundle`), ``delay`` (seconds before
    answering), ``status`` (answer this HTTP status with an OperationOutcome instead),
    ``code`` (answer this MessageHeader.response.code instead of ok/fatal-error).
    """

    def __init__(self) -> None:
        super().__init__()
        self.asynchronous = False
        self.status: int | None = None
        self.code: str | None = None
        self._server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def address(self) -> str:
        return self.url

    def reset(self) -> None:
        super().reset()
        self.asynchronous = False
        self.status = self.code = None

    async def _process(self, request: Request) -> Response:
        body = await request.body()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return Response(status_code=503)
        bundle = orjson.loads(body)
        key = str(bundle.get("id", ""))
        self._record(key, bundle)
        if self.status is not None:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "invalid", "diagnostics": self.reject_text}
                ],
            }
            return self._json(outcome, self.status)
        if self.asynchronous:
            return Response(status_code=202)
        code = self.code or ("fatal-error" if self.reject else "ok")
        text = self.reject_text if code != "ok" else ""
        return self._json(response_bundle(key, code, text=text), 200)

    @staticmethod
    def _json(body: Any, status: int) -> Response:
        return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON)

    def start(self) -> FhirReceiver:
        app = Starlette(routes=[Route("/fhir/$process-message", self._process, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            loop="asyncio",
            lifespan="off",
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, name="fhir-standin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the FHIR stand-in did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._server = self._thread = None


class MllpReceiver(_Receiver):
    """A recipient's HL7 v2 system behind MLLP. ``address`` is ``127.0.0.1:PORT``; it answers
    each message with an ACK: AA, echoing MSH-10 in MSA-2.

    Switches: ``down`` (closes the connection without an ACK, nothing recorded),
    ``reject`` (AE with ``reject_text`` in MSA-3 and ERR-8), ``delay`` (seconds before
    answering), ``code`` (answer this MSA-1 instead: AR, CA, CE, CR …).
    """

    def __init__(self) -> None:
        super().__init__()
        self.code: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        super().reset()
        self.code = None

    def ack(self, er7: str) -> bytes:
        msg = hl7.parse(er7)
        control_id = str(msg["MSH.F10"])
        self._record(control_id, er7)
        code = self.code or ("AE" if self.reject else "AA")
        text = "" if code in ("AA", "CA") else self.reject_text
        esc = msg.escape
        segments = [
            f"MSH|^~\\&|STANDIN|STANDIN|BRYGGA|BRYGGA|{time.strftime('%Y%m%d%H%M%S')}||ACK^T02^ACK|"
            f"{uuid.uuid4().hex[:20]}|P|2.5",
            f"MSA|{code}|{esc(control_id)}|{esc(text)}",
        ]
        if text:
            segments.append(f"ERR||PID^1^3|207^Application internal error^HL70357|E||||{esc(text)}")
        return ("\r".join(segments) + "\r").encode("utf-8")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = Framer()
        try:
            while data := await reader.read(65536):
                for payload in framer.feed(data):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    if self.down:
                        return
                    writer.write(frame(self.ack(payload.decode("utf-8"))))
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def start(self) -> MllpReceiver:
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._connection, "127.0.0.1", self.port)
                )
            except BaseException as exc:  # a port taken: tell start()
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            # connections still open (a delayed answer): end them before the loop goes
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="mllp-standin", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise RuntimeError("the MLLP stand-in did not start") from errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            loop, server = self._loop, self._server

            def close() -> None:
                if server is not None:
                    server.close()
                    if hasattr(server, "close_clients"):
                        server.close_clients()
                loop.stop()

            loop.call_soon_threadsafe(close)
            self._thread.join(10)
        self._loop = self._server = self._thread = None
