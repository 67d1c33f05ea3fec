"""The HTTP edge: what no request may carry past it, whatever route it is for.

Three checks before any route code runs, so a bad input is a 4xx and never a database error:

- the body is at most ``max_body_bytes`` (counted as it streams in, not from Content-Length
  alone): 413;
- the path and the query hold no control characters (PostgreSQL refuses NUL in text): 400;
- a JSON body holds no NaN or Infinity (not JSON, RFC 8259), no NUL and no lone surrogate
  (neither can be stored as UTF-8 text): 400.

The answers never repeat the input: it may be patient data. ``/fhir`` paths answer a FHIR
OperationOutcome, the rest ``{"detail": ...}``.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import Settings

DEFAULT_MAX_BODY_BYTES = Settings.model_fields["http_max_body_bytes"].default
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


class InputRefused(Exception):
    """A request the edge refuses: ``where`` names the place, ``text`` says what is wrong."""

    def __init__(self, status: int, where: str, text: str) -> None:
        super().__init__(text)
        self.status, self.where, self.text = status, where, text


def refusal(path: str, status: int, where: str, text: str) -> JSONResponse:
    """The error answer for ``path``: an OperationOutcome under /fhir, else a detail."""
    if not path.startswith("/fhir"):
        return JSONResponse({"detail": text, "location": where}, status_code=status)
    code = {413: "too-long", 500: "exception"}.get(status, "invalid")
    issue = {"severity": "error", "code": code, "expression": [where], "diagnostics": text}
    return JSONResponse(
        {"resourceType": "OperationOutcome", "issue": [issue]},
        status_code=status,
        media_type="application/fhir+json",
    )


def check_url(scope: Scope) -> None:
    """No control characters in the path or in a query parameter's name or value."""
    if _CONTROL.search(scope.get("path", "")):
        raise InputRefused(400, "path", "the path must not contain control characters")
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if _CONTROL.search(name) or _CONTROL.search(value):
            where = name if not _CONTROL.search(name) else "query"
            raise InputRefused(400, where, "a query parameter must not contain control characters")


def _reject_constant(name: str) -> Any:
    raise InputRefused(400, "body", f"{name} is not a JSON number (RFC 8259)")


def check_json(body: bytes) -> None:
    """Refuse NaN/Infinity and strings that cannot be stored; leave malformed JSON to the
    route (it answers its own, documented parse error)."""
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise InputRefused(400, "body", "the JSON is nested too deeply") from None
    except ValueError:
        return
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            rtype = value.get("resourceType")
            prefix = rtype if not where and isinstance(rtype, str) else where
            for key, item in value.items():
                if _UNSTORABLE.search(key):
                    text = "a name must not hold NUL or a lone surrogate"
                    raise InputRefused(400, where or "body", text)
                stack.append((f"{prefix}.{key}" if prefix else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and _UNSTORABLE.search(value):
            raise InputRefused(400, where or "body", "text must not hold NUL or a lone surrogate")


def _is_json(scope: Scope) -> bool:
    """FastAPI reads a body as JSON when its type is JSON or not given at all."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return True


class InputLimits:
    """ASGI middleware: the checks above, for every HTTP request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_url(scope)
            body = await self._body(scope, receive)
            if body and _is_json(scope):
                check_json(body)
        except InputRefused as refused:
            answer = refusal(scope.get("path", ""), refused.status, refused.where, refused.text)
            await answer(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, refused as soon as it is known to be too large."""
        too_large = InputRefused(
            413, "body", f"the request body is larger than {self.max_body_bytes} bytes"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
