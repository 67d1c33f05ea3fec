"""Bad HTTP input gets a 4xx naming the place, never a 500 and never the input echoed.

The table holds the causes of the 500s found by attack (issue 9) and their neighbours; it
runs against the app served by uvicorn over a loopback socket, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hypothesis import given
from hypothesis import strategies as st

from gateway.api.app import create_app
from gateway.api.limits import InputRefused, check_json, check_url
from gateway.api.auth import TokenKeys
from gateway.api.routes_directory import EXAMPLES
from tests.apiserver import ApiServer
from tests.support import personnummer

LIMIT = 1 << 20
PNR = personnummer(7)  # must never come back in an answer
PNR_SYSTEM = "http://electronichealth.se/identifier/personnummer"
ENDPOINT = {
    "resourceType": "Endpoint",
    "status": "active",
    "connectionType": {"code": "hl7-fhir-msg"},
    "payloadType": [{"text": "LUS"}],
    "address": "https://example.se/fhir",
}
ORGANIZATION = {k: v for k, v in EXAMPLES["Organization"].items() if k != "id"}
MSG = {"resourceType": "MessageHeader", "eventCoding": {"code": "x"}}


def consent(**changes: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "patient": {"identifier": {"system": PNR_SYSTEM, "value": PNR}},
        **changes,
    }


def bundle(entry: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "message", "entry": entry}


def response_entry(**response: Any) -> list[dict[str, Any]]:
    return [{"resource": {**MSG, "response": response}}]


# (method, path, body (object -> JSON, str -> raw text), status, expression or location)
CASES: list[tuple[str, str, Any, int, str]] = [
    ("GET", "/api/v1/stats?month=0000-01", None, 422, ""),
    ("GET", "/api/v1/stats?month=9999-12", None, 422, ""),
    ("GET", "/api/v1/stats?month=2026-13", None, 422, ""),
    ("POST", "/api/v1/audit/search", '{"patient": "%s", "limit": NaN}' % PNR, 400, "body"),
    ("POST", "/api/v1/audit/search", '{"patient": "%s", "limit": -Infinity}' % PNR, 400, "body"),
    ("POST", "/api/v1/audit/search", '{"patient": "\\ud800%s"}' % PNR, 400, "patient"),
    ("POST", "/api/v1/audit/search", {"patient": PNR, "limit": 10**30}, 422, ""),
    ("POST", "/api/v1/audit/search", {"patient": PNR, "limit": PNR}, 422, ""),
    ("POST", "/api/v1/audit/search", [PNR], 422, ""),
    ("POST", "/fhir/Consent", consent(status=5), 400, "Consent.status"),
    ("POST", "/fhir/Consent", consent(patient=7), 400, "Consent.patient"),
    ("POST", "/fhir/Consent", consent(category="samtycke"), 400, "Consent.category"),
    ("POST", "/fhir/Consent", consent(provision=[1]), 400, "Consent.provision"),
    ("POST", "/fhir/Consent", consent(dateTime={"at": PNR}), 400, "Consent.dateTime"),
    ("POST", "/fhir/Consent", '{"resourceType": "Consent", "status": NaN}', 400, "body"),
    ("POST", "/fhir/Consent", consent(status="active\u0000"), 400, "Consent.status"),
    ("POST", "/fhir/Consent", "[" * 100_000, 400, "body"),
    ("POST", "/fhir/Consent", '{"resourceType": "Consent", "x": "\xff', 400, "body"),
    ("PUT", "/fhir/Consent/a%00b", consent(), 400, "path"),
    ("GET", "/fhir/Consent/a%00b", None, 400, "path"),
    ("GET", f"/fhir/Consent?patient:identifier={PNR_SYSTEM}|%00", None, 400, "patient:identifier"),
    ("POST", "/fhir/Endpoint", ENDPOINT | {"address": [1]}, 400, "Endpoint.address"),
    ("POST", "/fhir/Endpoint", ENDPOINT | {"status": 5}, 400, "Endpoint.status"),
    ("POST", "/fhir/Endpoint", ENDPOINT | {"address": {"url": PNR}}, 400, "Endpoint.address"),
    ("POST", "/fhir/Organization", {"resourceType": "Organization", "identifier": 5}, 400,
     "Organization.identifier"),
    ("POST", "/fhir/Organization", {"resourceType": "Organization", "name": "A\u0000"}, 400,
     "Organization.name"),
    ("POST", "/fhir/HealthcareService", {"resourceType": "HealthcareService",
     "availableTime": "x"}, 400, "HealthcareService.availableTime"),
    ("PUT", "/fhir/Organization/" + "a" * 65, ORGANIZATION, 400, "Organization.id"),
    ("PUT", "/fhir/Organization/a%20b", ORGANIZATION, 400, "Organization.id"),
    ("GET", "/fhir/Organization?identifier=x%00", None, 400, "identifier"),
    ("GET", "/fhir/Endpoint/%01", None, 400, "path"),
    ("DELETE", "/fhir/HealthcareService/a%00", None, 400, "path"),
    ("POST", "/fhir/$process-message", bundle(5), 400, "Bundle.entry"),
    ("POST", "/fhir/$process-message", bundle({"resource": 1}), 400, "Bundle.entry"),
    ("POST", "/fhir/$process-message", bundle(response_entry(code=[], identifier="x")), 400,
     "Bundle.entry[0].resource.response.code"),
    ("POST", "/fhir/$process-message", bundle(response_entry(code="ok", identifier={})), 400,
     "Bundle.entry[0].resource.response.identifier"),
    ("POST", "/fhir/$process-message", bundle(response_entry(code="ok", identifier="a\u0000")),
     400, "Bundle.entry[0].resource.response.identifier"),
    ("GET", "/api/v1/messages/a%00b", None, 400, "path"),
    ("GET", "/api/v1/inbox/%00", None, 400, "path"),
    ("POST", "/api/v1/inbox/x/acknowledge", {"name": "\u0000", "role": "x"}, 400, "name"),
    ("GET", "/api/v1/deviations?state=%00", None, 400, "state"),
    ("POST", "/fhir/Consent", {"resourceType": "Consent", "x": "a" * LIMIT}, 413, "body"),
    ("POST", "/api/v1/audit/search", {"patient": "a" * LIMIT}, 413, "body"),
]


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    api = ApiServer(database_url, tmp_path / "keys", max_body_bytes=LIMIT).start()
    try:
        yield api
    finally:
        api.stop()


def _send(client: httpx.Client, server: ApiServer, method: str, path: str, body: Any) -> Any:
    content = body if isinstance(body, str | None) else json.dumps(body)
    return client.request(
        method,
        path,
        content=content.encode("utf-8", "surrogatepass") if content is not None else None,
        headers={**server.headers(path), "Content-Type": "application/json"},
    )


def test_every_bad_input_is_a_4xx_naming_the_place(server: ApiServer) -> None:
    failures = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, body, status, where in CASES:
            r = _send(client, server, method, path, body)
            problem = _check(r, path, status, where)
            if problem:
                failures.append(f"{method} {path[:60]} {str(body)[:60]!r}: {problem}")
    assert not failures, "\n".join(failures)


def _check(r: httpx.Response, path: str, status: int, where: str) -> str:
    if r.status_code != status:
        return f"{r.status_code} (wanted {status}): {r.text[:200]}"
    if PNR in r.text:
        return "the answer repeats the identity number"
    if path.startswith("/fhir"):
        issue = r.json()["issue"][0]
        if r.json()["resourceType"] != "OperationOutcome" or not issue["diagnostics"]:
            return f"not an OperationOutcome: {r.text[:200]}"
        if where and issue["expression"] != [where]:
            return f"expression {issue['expression']} (wanted {where})"
        return ""
    detail = r.json()["detail"]
    if not detail:
        return "no message"
    if where and r.json().get("location") != where:
        return f"location {r.json().get('location')!r} (wanted {where})"
    return ""


def test_a_streamed_body_is_counted_not_only_its_content_length(server: ApiServer) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"resourceType": "Consent", "x": "'
        for _ in range(LIMIT // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(
            "/fhir/Consent",
            content=chunks(),
            headers={**server.headers("/fhir/Consent"), "Content-Type": "application/json"},
        )
        assert r.status_code == 413, r.text
        assert r.json()["issue"][0]["code"] == "too-long"
        # A body just under the limit is read and judged on its content.
        small = {"resourceType": "Consent", "x": "a" * (LIMIT - 100)}
        r = _send(client, server, "POST", "/fhir/Consent", small)
        assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Consent.x"]


async def test_an_unexpected_error_is_a_500_without_its_text(tmp_path: Path) -> None:
    app = create_app(None, TokenKeys(Ed25519PrivateKey.generate()), list)  # type: ignore[arg-type]

    @app.get("/fhir/boom")
    @app.get("/api/v1/boom")
    async def boom() -> None:
        raise ValueError(f"patient {PNR}")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        fhir = await client.get("/fhir/boom")
        ops = await client.get("/api/v1/boom")
    assert fhir.status_code == ops.status_code == 500
    assert fhir.json()["issue"][0]["code"] == "exception" and "detail" in ops.json()
    assert PNR not in fhir.text + ops.text and "ValueError" not in fhir.text + ops.text


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)  # surrogates included
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=20,
)


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _texts(item)


@given(JSON_VALUES)
def test_a_json_body_is_refused_exactly_when_its_text_cannot_be_stored(value: Any) -> None:
    body = json.dumps(value).encode()  # ASCII: NUL and surrogates as \u escapes
    unstorable = any(c == "\0" or "\ud800" <= c <= "\udfff" for t in _texts(value) for c in t)
    if unstorable:
        with pytest.raises(InputRefused):
            check_json(body)
    else:
        check_json(body)


@given(ANY_TEXT, ANY_TEXT)
def test_a_url_is_refused_exactly_when_it_holds_a_control_character(path: str, query: str) -> None:
    from urllib.parse import quote

    encoded = quote(query, errors="surrogatepass")
    scope = {"path": "/" + path, "query_string": f"q={encoded}".encode()}
    control = any(ord(c) < 32 or ord(c) == 127 for c in path + query)
    if control:
        with pytest.raises(InputRefused):
            check_url(scope)
    else:
        check_url(scope)
