"""MLLP over TLS, with and without client certificates, against the real gateway process."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from adapters.takecare import mllp
from gateway.demo import admission
from tests.support import Broker, GatewayProcess, now_sthlm, personnummer, wait_for
from tests.test_e2e_path import msa
from tests.tls import ThrowawayCA


def _client(ca: ThrowawayCA, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.cert_path)
    if cert:
        context.load_cert_chain(*cert)
    return context


def _send(gw: GatewayProcess, message: bytes, context: ssl.SSLContext | None) -> bytes:
    return asyncio.run(mllp.send("127.0.0.1", gw.mllp_port, [message], timeout=10, ssl=context))[0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_mllp_over_mutual_tls(tmp_path: Path, database_url: str, broker: Broker) -> None:
    ca = ThrowawayCA(tmp_path / "pki")
    server_cert, server_key = ca.issue("gateway", server=True)
    gw = GatewayProcess(
        tmp_path / "gw",
        database_url,
        broker.bootstrap,
        BRYGGA_MLLP_TLS_CERT=str(server_cert),
        BRYGGA_MLLP_TLS_KEY=str(server_key),
        BRYGGA_MLLP_TLS_CLIENT_CA=str(ca.cert_path),
    )
    gw.start()
    try:
        message = admission("TLS-1", now_sthlm(), pnr=personnummer(950))
        # TakeCare with a certificate from the trusted CA gets its ACK.
        ack = _send(gw, message, _client(ca, ca.issue("takecare", server=False)))
        assert msa(ack)[1] == "AA" and msa(ack)[2] == "TLS-1"
        # Without a client certificate, or with one from another CA, no HL7 is exchanged.
        stranger = ThrowawayCA(tmp_path / "other", name="Other CA")
        for context in (_client(ca, None), _client(ca, stranger.issue("intruder", server=False))):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                _send(gw, admission("TLS-2", now_sthlm(), pnr=personnummer(951)), context)
        # Plain TCP to a TLS port gets no answer either.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
            asyncio.run(mllp.send("127.0.0.1", gw.mllp_port, [message], timeout=3))
    finally:
        gw.stop()
    assert "TLS-2" not in gw.logs()  # refused before any message was read


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_https_with_client_certificates(tmp_path: Path, database_url: str, broker: Broker) -> None:
    """The API over HTTPS (TLS 1.2+) with mutual TLS: only clients with a certificate from the
    trusted CA get an answer, and they still need a token."""
    import httpx

    ca = ThrowawayCA(tmp_path / "pki")
    server_cert, server_key = ca.issue("gateway", server=True)
    gw = GatewayProcess(
        tmp_path / "gw",
        database_url,
        broker.bootstrap,
        BRYGGA_HTTP_TLS_CERT=str(server_cert),
        BRYGGA_HTTP_TLS_KEY=str(server_key),
        BRYGGA_HTTP_TLS_CLIENT_CA=str(ca.cert_path),
    )
    gw.start()
    try:
        assert gw.base_url.startswith("https://")
        client_cert = ca.issue("kommunen", server=False)
        trusted = _client(ca, client_cert)
        wait_for(
            lambda: httpx.get(f"{gw.base_url}/readyz", verify=trusted).status_code == 200,
            what="ready over mutual TLS",
        )
        inbox = httpx.get(
            f"{gw.base_url}/api/v1/inbox", verify=trusted, headers=gw.token("SE5566778899-HT01")
        )
        assert inbox.status_code == 200 and inbox.json() == []
        # No client certificate, one from another CA, or plain HTTP: no answer.
        stranger = ThrowawayCA(tmp_path / "other", name="Other CA")
        for context in (_client(ca, None), _client(ca, stranger.issue("intruder", server=False))):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                httpx.get(f"{gw.base_url}/readyz", verify=context)
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"http://127.0.0.1:{gw.http_port}/readyz")
        # A client that does not trust the gateway's CA refuses the server.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gw.base_url}/readyz", verify=ssl.create_default_context())
    finally:
        gw.stop()


def test_half_a_tls_configuration_is_refused() -> None:
    from gateway.settings import Settings

    with pytest.raises(ValueError, match="HTTP TLS needs both"):
        Settings(http_tls_cert=Path("/x.pem")).http_tls()
    with pytest.raises(ValueError, match="MLLP TLS needs both"):
        Settings(mllp_tls_client_ca=Path("/ca.pem")).mllp_ssl_context()
