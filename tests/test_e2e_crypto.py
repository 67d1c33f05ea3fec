"""Encryption on real parts: nothing readable in the database or on Kafka; rotation under load.

Gateway processes over MLLP, a real broker, SQLite and PostgreSQL; the database is read with
plain SQL (and, for SQLite, as a file), the topics with a plain Kafka consumer.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from gateway.crypto import envelope
from gateway.crypto.kek import encode_keys, new_key, write_key_file
from gateway.demo import HOME_CARE, admission
from gateway.model.bundle import CONSENT_BASIS_SYSTEM
from gateway.model.identifiers import SYSTEMS, IdentifierKind
from tests.support import (
    ON_BOTH_BROKERS,
    AnyBroker,
    GatewayProcess,
    now_sthlm,
    personnummer,
    wait_for,
)
from tests.test_e2e_crash import _all_records, _delivered_exactly_once
from tests.test_e2e_path import msa, send
from tests.test_takecare_receipts import TakeCareListener, reporting_gateway, takecare

pytestmark = pytest.mark.slow
__all__ = ["takecare"]  # the fixture, shared with the receipts tests


def _patient(n: int) -> dict[str, str]:
    return {
        "pnr": personnummer(700 + n),
        "family": f"Krypteradsson{chr(65 + n)}",
        "given": f"Hemlig{chr(65 + n)}a",
        "street": f"Lönngatan {40 + n}",
    }


def _admission(control_id: str, p: dict[str, str]) -> bytes:
    message = admission(control_id, now_sthlm(), pnr=p["pnr"], family=p["family"], given=p["given"])
    return message.replace(b"Storgatan 1", p["street"].encode())


def _forms(p: dict[str, str]) -> list[str]:
    """Every way the patient could show: personnummer in 12, 10 and dashed forms, names,
    street address."""
    pnr = p["pnr"]
    return [
        pnr,
        pnr[2:],
        f"{pnr[:8]}-{pnr[8:]}",
        f"{pnr[2:8]}-{pnr[8:]}",
        p["family"],
        p["given"],
        p["street"],
    ]


def _encodings(secret: str) -> list[bytes]:
    return list({secret.encode("utf-8"), secret.encode("latin-1")})


def _plain_sql(url: str, *queries: str) -> list[list[tuple[Any, ...]]]:
    """Rows of each query, through the plain driver (sqlite3, asyncpg): no gateway code."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        conn = sqlite3.connect(str(parsed.database))
        try:
            return [list(conn.execute(q)) for q in queries]
        finally:
            conn.close()

    import asyncpg

    async def go() -> list[list[tuple[Any, ...]]]:
        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            return [[tuple(r.values()) for r in await conn.fetch(q)] for q in queries]
        finally:
            await conn.close()

    return asyncio.run(go())


def _database_rows(url: str) -> list[tuple[str, Any]]:
    """(table, value) for every value of every row of every table, read with plain SQL."""
    sqlite = make_url(url).get_backend_name() == "sqlite"
    [tables] = _plain_sql(
        url,
        "SELECT name FROM sqlite_master WHERE type = 'table'"
        if sqlite
        else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
    )
    names = [t[0] for t in tables]
    contents = _plain_sql(url, *(f'SELECT * FROM "{name}"' for name in names))
    return [
        (name, value)
        for name, rows in zip(names, contents, strict=True)
        for row in rows
        for value in row
    ]


def _assert_nowhere(secrets: list[str], where: str, values: list[tuple[str, Any]]) -> None:
    patterns = [(s, e) for s in secrets for e in _encodings(s)]
    for table, value in values:
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        for secret, encoded in patterns:
            assert encoded not in data, f"{secret!r} in the clear in {where} {table}"


@ON_BOTH_BROKERS
def test_no_patient_data_in_the_clear_in_the_database_or_on_kafka(
    tmp_path: Path, database_url: str, broker: AnyBroker, takecare: TakeCareListener
) -> None:
    # Receipts back to TakeCare are stored first: source_notifications gets ORUs with PID.
    gw = reporting_gateway(tmp_path, database_url, broker, takecare)
    gw.start()
    patients = [_patient(n) for n in range(3)]
    try:
        for n, p in enumerate(patients):
            assert msa(send(gw, _admission(f"ENC-{n}", p)))[1] == "AA"
        # A consent recorded over FHIR too: consents.resource holds the identity number.
        consent = {
            "resourceType": "Consent",
            "status": "active",
            "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "samtycke"}]}],
            "patient": {
                "identifier": {
                    "system": SYSTEMS[IdentifierKind.PERSONNUMMER],
                    "value": patients[0]["pnr"],
                }
            },
            "provision": {"type": "permit"},
        }
        posted = httpx.post(
            f"{gw.base_url}/fhir/Consent",
            json=consent,
            headers=gw.token("SE2321000016-H001", "integration"),
        )
        assert posted.status_code == 201, posted.text
        headers = gw.token(HOME_CARE)
        notices = wait_for(
            lambda: (
                r
                if len(r := httpx.get(f"{gw.base_url}/api/v1/inbox", headers=headers).json()) == 3
                else None
            ),
            what="three notices",
        )
        # An authorised reader sees the patient in the clear.
        by_family = {n["patient"]["name"].split()[-1]: n for n in notices}
        for p in patients:
            notice = by_family[p["family"]]
            assert notice["patient"]["identifier"] == p["pnr"]
            opened = httpx.get(f"{gw.base_url}/api/v1/inbox/{notice['id']}", headers=headers)
            assert opened.status_code == 200
            patient = next(
                e["resource"]
                for e in opened.json()["bundle"]["entry"]
                if e["resource"]["resourceType"] == "Patient"
            )
            assert patient["name"][0]["family"] == p["family"]
            assert patient["name"][0]["given"] == [p["given"]]
        # Receipts to TakeCare (an ORU carries the PID) were stored, then sent.
        wait_for(lambda: len(takecare.oru()) >= 3, what="receipts at TakeCare")
        assert any(p["pnr"] in str(m) for p in patients for m in takecare.oru())
    finally:
        gw.stop()

    secrets = [s for p in patients for s in _forms(p)]
    rows = _database_rows(database_url)
    tables = {t for t, _ in rows}
    assert {"messages", "source_notifications", "outbox", "data_keys"} <= tables
    assert sum(t == "source_notifications" for t, _ in rows) > 0
    _assert_nowhere(secrets, "the database table", rows)
    parsed = make_url(database_url)
    if parsed.get_backend_name() == "sqlite":  # the file itself, and its write-ahead log
        files = [Path(str(parsed.database)), Path(f"{parsed.database}-wal")]
        contents = [(f.name, f.read_bytes()) for f in files if f.exists()]
        _assert_nowhere(secrets, "the file", contents)

    records = _all_records(broker)
    assert len(records) >= 3 * 3
    for key, value in records:
        assert key is not None and len(key) == 32
        assert envelope.is_sealed(value), "a record value that is not encrypted"
        assert b"message_id" not in value and b"message." not in value
    _assert_nowhere(secrets, "Kafka", [("record", v) for _, v in records])


def _dek_ids(url: str, table: str, column: str) -> list[str]:
    """The data key of each value, oldest row first, read with plain SQL."""
    order = "received_at" if table == "messages" else "created_at"
    [rows] = _plain_sql(url, f"SELECT {column} FROM {table} ORDER BY {order}")
    out = []
    for (value,) in rows:
        data = envelope.from_text(value) if isinstance(value, str) else bytes(value)
        assert data is not None
        out.append(envelope.dek_id_of(data))
    return out


@ON_BOTH_BROKERS
def test_keys_rotate_while_messages_flow_loses_and_duplicates_nothing(
    tmp_path: Path, database_url: str, broker: AnyBroker
) -> None:
    gw = GatewayProcess(tmp_path / "gw", database_url, broker, BRYGGA_KEY_CACHE_SECONDS="0.5")
    gw.start()
    sent: dict[str, dict[str, str]] = {}
    acked: list[str] = []
    stop = threading.Event()

    def sender() -> None:  # one message after another, as TakeCare sends, until told to stop
        while not stop.is_set():
            i = len(sent)
            control_id = f"ROT-{i}"
            sent[control_id] = p = _patient(i % 20) | {"pnr": personnummer(800 + i)}
            if msa(send(gw, _admission(control_id, p)))[1] == "AA":
                acked.append(control_id)
            time.sleep(0.05)

    def after(more: int) -> None:
        count = len(acked) + more
        wait_for(lambda: len(acked) >= count, what=f"{count} messages accepted")

    def rotate(*args: str) -> str:
        before = len(acked)
        # As an operator runs it: a separate process, while the stream goes on.
        done = gw.cli("keys", "rotate", *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert len(acked) > before, "no message arrived while the rotation ran"
        return done.stdout

    stream = threading.Thread(target=sender)
    stream.start()
    try:
        try:
            after(10)
            assert "New active data key" in rotate()
            after(10)
            assert "re-wrapped" in rotate("--kek")
            after(10)
        finally:
            stop.set()
            stream.join(60)
        total = len(sent)
        assert acked == list(sent)
        _delivered_exactly_once(gw, total)

        url = gw.env["BRYGGA_DATABASE_URL"]
        raw_keys = _dek_ids(url, "messages", "raw")
        assert len(set(raw_keys)) == 2, "the rotation did not reach the running gateway"
        # One process, one connection: every message after the switch uses the new key.
        assert sum(a != b for a, b in zip(raw_keys, raw_keys[1:], strict=False)) == 1
        assert _dek_ids(url, "messages", "canonical") == raw_keys
        record_keys = {envelope.dek_id_of(v) for _, v in _all_records(broker)}
        assert set(raw_keys) <= record_keys

        shown = gw.cli("keys", "show")
        states = [line.split()[1] for line in shown.stdout.splitlines()[1:]]
        assert shown.returncode == 0 and states == ["retired", "active"], shown.stdout
    finally:
        gw.stop()

    # After a restart (new KEK file only) everything written before and after is readable.
    gw.start()
    try:
        names = {n["patient"]["name"] for n in _inbox(gw)}
        assert {f"{p['given']} {p['family']}" for p in sent.values()} <= names
        again = gw.cli("keys", "reencrypt")
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(set(_dek_ids(gw.env["BRYGGA_DATABASE_URL"], "messages", "raw"))) == 1
        assert {n["patient"]["name"] for n in _inbox(gw)} == names
    finally:
        gw.stop()


def _inbox(gw: GatewayProcess) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.base_url}/api/v1/inbox", headers=gw.token(HOME_CARE))
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def test_a_process_without_the_kek_does_not_start(tmp_path: Path, database_url: str) -> None:
    holder = GatewayProcess(tmp_path / "a", database_url, None)
    refused = holder.cli("keys", "rotate")
    assert refused.returncode == 2 and "BRYGGA_KEK" in refused.stdout  # no KEK: none made up
    write_key_file(holder.data_dir / "keys" / "kek.key", [new_key()])
    assert holder.cli("keys", "rotate").returncode == 0
    # It fails before it would start a broker (none is given): nothing runs without the keys.
    stranger = GatewayProcess(
        tmp_path / "b", database_url, None, BRYGGA_KEK=encode_keys([new_key()]).strip()
    )
    with pytest.raises(RuntimeError, match="gateway.keys_unavailable") as caught:
        stranger.start(timeout=60)
    kek_id = re.search(r"local-[0-9a-f]{16}", holder.cli("keys", "show").stdout)
    assert kek_id and kek_id.group() in str(caught.value)  # it names the KEK it lacks
