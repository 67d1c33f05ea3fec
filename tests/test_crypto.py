"""Envelope encryption: the format, tampering, KEKs, encrypted columns, rotation, re-encryption.

Database tests run on SQLite and PostgreSQL (the ``db`` fixture installs a keyring).
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text, update
from sqlalchemy.exc import StatementError

from gateway import clock
from gateway.bus import topics
from gateway.crypto import columns, envelope
from gateway.crypto.envelope import DecryptionError, column_context, record_context
from gateway.crypto.kek import KeyUnavailable, LocalKek, encode_keys, new_key, parse_keys
from gateway.crypto.keyring import Keyring
from gateway.crypto.maintenance import (
    reencrypt,
    rotate_data_key,
    rotate_local_kek,
)
from gateway.pipeline.consent import accepted_event
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.tables import data_keys, messages, source_notifications
from tests.inprocess import KEYER, Pipeline, canonical
from tests.support import personnummer

PNR = personnummer(77)
SECRET = f"PID|1||{PNR}^^^^PNR||Hemligsson^Greta||Storgatan 1^^Stockholm".encode()
DEK_ID = uuid.uuid4().bytes


def _aead() -> envelope.AESGCM:
    return envelope.AESGCM(new_key())


# ---------------------------------------------------------------------------- the format


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=4096), row_id=st.text(max_size=40), label=st.text(max_size=40))
def test_seal_then_open_gives_back_the_plaintext(plaintext: bytes, row_id: str, label: str) -> None:
    aead = _aead()
    context = column_context(label, row_id)
    sealed = envelope.seal(aead, DEK_ID, plaintext, context)
    assert len(sealed) == len(plaintext) + envelope.OVERHEAD
    assert envelope.dek_id_of(sealed) == str(uuid.UUID(bytes=DEK_ID))
    assert envelope.open_sealed(aead, sealed, context) == plaintext
    assert envelope.from_text(envelope.to_text(sealed)) == sealed
    # Random nonces: the same value twice is two different ciphertexts.
    assert envelope.seal(aead, DEK_ID, plaintext, context) != sealed


def _assert_refused(aead: envelope.AESGCM, value: bytes, context: bytes) -> None:
    with pytest.raises(DecryptionError) as caught:
        envelope.open_sealed(aead, value, context)
    shown = f"{caught.value} {caught.value!r}"
    for secret in (PNR, PNR[2:], "Hemligsson", "Storgatan"):
        assert secret not in shown


@pytest.mark.parametrize(
    "offset",
    [0, 1, 2, 17, 18, 29, 30, 40, -17, -1],
    ids=["magic", "version", "dek0", "dek15", "nonce0", "nonce11", "ct0", "ct10", "ct-last", "tag"],
)
def test_any_changed_byte_is_refused_without_showing_the_plaintext(offset: int) -> None:
    aead = _aead()
    context = column_context("messages.raw", "m-1")
    sealed = bytearray(envelope.seal(aead, DEK_ID, SECRET, context))
    sealed[offset] ^= 0x01
    _assert_refused(aead, bytes(sealed), context)


def test_a_value_moved_elsewhere_is_refused() -> None:
    aead = _aead()
    sealed = envelope.seal(aead, DEK_ID, SECRET, column_context("messages.raw", "m-1"))
    for elsewhere in (
        column_context("messages.raw", "m-2"),  # another row
        column_context("source_notifications.payload", "m-1"),  # another column
        record_context(topics.EVENTS, "m-1"),  # onto Kafka
    ):
        _assert_refused(aead, sealed, elsewhere)
    record = envelope.seal(aead, DEK_ID, b"{}", record_context(topics.EVENTS, "k1"))
    _assert_refused(aead, record, record_context(topics.DELIVERIES, "k1"))  # another topic
    _assert_refused(aead, record, record_context(topics.EVENTS, "k2"))  # another key
    _assert_refused(aead, sealed[:-1], column_context("messages.raw", "m-1"))  # truncated
    _assert_refused(_aead(), sealed, column_context("messages.raw", "m-1"))  # another key


def test_plaintext_and_other_versions_are_not_envelopes() -> None:
    aead = _aead()
    with pytest.raises(DecryptionError, match="not an encrypted value"):
        envelope.open_sealed(aead, SECRET, b"")
    future = bytearray(envelope.seal(aead, DEK_ID, b"x", b""))
    future[1] = 2
    with pytest.raises(DecryptionError, match="version 2"):
        envelope.open_sealed(aead, bytes(future), b"")
    assert envelope.from_text('{"resourceType": "Bundle"}') is None


# ---------------------------------------------------------------------------- KEKs


def test_kek_file_is_created_once_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "kek.key"
    first = LocalKek.from_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = LocalKek.from_file(path)
    assert again.key_id == first.key_id
    wrapped = first.wrap(b"d" * 32, "dek-1")
    assert again.unwrap(wrapped, "dek-1", first.key_id) == b"d" * 32
    with pytest.raises(KeyUnavailable):
        again.unwrap(wrapped, "dek-2", first.key_id)  # bound to its DEK id
    with pytest.raises(FileNotFoundError):
        LocalKek.from_file(tmp_path / "missing.key", create=False)


def test_kek_from_the_environment_keeps_previous_keys_readable() -> None:
    old, new = new_key(), new_key()
    wrapped = LocalKek([old]).wrap(b"d" * 32, "dek-1")
    both = LocalKek.from_text(encode_keys([new, old]).replace("\n", ", "))
    assert both.key_id == LocalKek([new]).key_id
    assert both.unwrap(wrapped, "dek-1", LocalKek([old]).key_id) == b"d" * 32
    with pytest.raises(KeyUnavailable) as caught:
        LocalKek([new]).unwrap(wrapped, "dek-1", LocalKek([old]).key_id)
    assert "BRYGGA_KEK" in str(caught.value)
    with pytest.raises(ValueError, match="32 bytes"):
        parse_keys("c2hvcnQ=")


def test_kek_setting_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    value = encode_keys([new_key()]).strip()
    monkeypatch.setenv("BRYGGA_KEK", value)
    settings_ = Settings()
    assert value not in repr(settings_) and value not in str(settings_.model_dump())


# ---------------------------------------------------------------------------- columns


async def _stored(db: Database, column: str, message_id: str) -> bytes | str:
    """The value as the database holds it, read with plain SQL."""
    async with db.read() as conn:
        return (
            await conn.execute(
                text(f"SELECT {column} FROM messages WHERE id = :id"), {"id": message_id}
            )
        ).scalar_one()


async def _accept(pipeline: Pipeline, n: int, raw: bytes = SECRET) -> str:
    accepted = await pipeline.intake.accept(
        source="T|CRYPTO",
        control_id=f"C-{n}",
        raw=raw,
        message=canonical(n, family="Hemligsson"),
        answer=lambda mid: b"MSH|ACK",
    )
    return accepted.message_id


async def test_patient_columns_are_stored_sealed_and_read_in_the_clear(db: Database) -> None:
    mid = await _accept(Pipeline(db), 1)
    raw = await _stored(db, "raw", mid)
    bundle = await _stored(db, "canonical", mid)
    assert isinstance(bundle, str) and "Hemligsson" not in bundle and PNR not in bundle
    assert envelope.is_sealed(bytes(raw)) and SECRET not in bytes(raw)
    assert await _stored(db, "ack", mid) == b"MSH|ACK"  # header fields only: not encrypted
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(messages.c.raw, messages.c.canonical.label("bundle")).where(
                    messages.c.id == mid
                )
            )
        ).one()
    assert row.raw == SECRET
    assert json.loads(row.bundle)["entry"][1]["resource"]["name"][0]["family"] == "Hemligsson"


async def test_a_ciphertext_swapped_between_rows_is_refused(db: Database) -> None:
    pipeline = Pipeline(db)
    first, second = await _accept(pipeline, 2), await _accept(pipeline, 3)
    async with db.transaction() as conn:  # an attacker with write access swaps the raw values
        other = await conn.execute(text("SELECT raw FROM messages WHERE id = :id"), {"id": second})
        await conn.execute(
            text("UPDATE messages SET raw = :raw WHERE id = :id"),
            {"raw": other.scalar_one(), "id": first},
        )
    async with db.read() as conn:
        with pytest.raises(DecryptionError) as caught:
            (await conn.execute(select(messages.c.raw).where(messages.c.id == first))).one()
    assert first in str(caught.value) and PNR not in str(caught.value)


async def test_plaintext_is_never_written_and_old_plaintext_rows_are_read(db: Database) -> None:
    mid = await _accept(Pipeline(db), 4)
    async with db.transaction() as conn:
        with pytest.raises(StatementError, match="encrypted") as refused:
            await conn.execute(update(messages).where(messages.c.id == mid).values(raw=SECRET))
        assert isinstance(refused.value.orig, TypeError) and PNR not in str(refused.value)
    # A row stored before schema 0004 holds plaintext: read as it is, unless refused.
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE messages SET raw = :raw, canonical = :c WHERE id = :id"),
            {"raw": b"MSH|legacy", "c": '{"legacy": true}', "id": mid},
        )
    query = select(messages.c.raw, messages.c.canonical).where(messages.c.id == mid)
    async with db.read() as conn:
        assert tuple((await conn.execute(query)).one()) == (b"MSH|legacy", '{"legacy": true}')
    keyring = columns.current()
    keyring.allow_plaintext = False
    try:
        async with db.read() as conn:
            with pytest.raises(DecryptionError, match="not encrypted"):
                (await conn.execute(query)).one()
    finally:
        keyring.allow_plaintext = True


async def test_kafka_values_are_sealed_for_their_topic_and_key(db: Database) -> None:
    keyring = columns.current()
    event = accepted_event("m-1")
    value = topics.seal_record(keyring, topics.EVENTS, "k1", event.to_json())
    assert b"m-1" not in value
    assert await topics.open_record(keyring, topics.EVENTS, b"k1", value) == event
    with pytest.raises(DecryptionError):
        await topics.open_record(keyring, topics.RECEIPTS, b"k1", value)
    with pytest.raises(DecryptionError):  # plaintext (a forged record) is refused
        await topics.open_record(keyring, topics.EVENTS, b"k1", event.to_json().encode())


# ---------------------------------------------------------------------------- rotation


async def _dek_of(db: Database, message_id: str) -> str:
    return envelope.dek_id_of(bytes(await _stored(db, "raw", message_id)))


async def test_rotation_reaches_a_running_keyring_and_old_rows_stay_readable(db: Database) -> None:
    pipeline = Pipeline(db)
    keyring = columns.current()
    assert isinstance(keyring, Keyring)
    keyring.cache_seconds = 0.0  # look up the active key at every seal
    before = await _accept(pipeline, 5)
    # Another process: started before the rotation, it has not seen the new key.
    other = Keyring(db, keyring.kek, cache_seconds=3600)
    await other.refresh(strict=True)

    new_id, retired = await rotate_data_key(db, keyring.kek)
    assert retired == [await _dek_of(db, before)]
    await keyring.refresh()
    after = await _accept(pipeline, 6)
    assert await _dek_of(db, after) == new_id != await _dek_of(db, before)

    columns.install(other)  # reads a row under a key it never loaded: loaded on demand
    try:
        async with db.read() as conn:
            rows = (
                await conn.execute(select(messages.c.id, messages.c.raw).order_by(messages.c.id))
            ).all()
        assert {r.raw for r in rows} == {SECRET} and other.loaded == 2
        third = await rotate_data_key(db, keyring.kek)
        record = topics.seal_record(keyring, topics.EVENTS, "k", "{}")
        assert envelope.dek_id_of(record) != third[0]  # keyring has not looked again yet
        await keyring.refresh()
        record = topics.seal_record(keyring, topics.EVENTS, "k", accepted_event("x").to_json())
        assert envelope.dek_id_of(record) == third[0]
        # The Kafka path loads the key without blocking, before it opens the record.
        await topics.open_record(other, topics.EVENTS, b"k", record)
        assert other.loaded == 3
    finally:
        columns.install(keyring)
    async with db.read() as conn:
        states = dict((await conn.execute(select(data_keys.c.id, data_keys.c.state))).all())
    assert sorted(states.values()) == ["active", "retired", "retired"]


async def test_reencrypt_moves_every_value_to_the_active_key(db: Database) -> None:
    pipeline = Pipeline(db)
    keyring = columns.current()
    assert isinstance(keyring, Keyring)
    old = [await _accept(pipeline, n) for n in (7, 8, 9)]
    legacy = old[2]
    async with db.transaction() as conn:  # one row from before encryption
        await conn.execute(
            text("UPDATE messages SET raw = :raw WHERE id = :id"), {"raw": SECRET, "id": legacy}
        )
        await conn.execute(
            source_notifications.insert().values(
                **columns.seal_row(
                    source_notifications,
                    {
                        "id": "n-1",
                        "message_id": old[0],
                        "state": "delivered",
                        "dedup_key": "d-1",
                        "channel": "test",
                        "payload": SECRET,
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": clock.now(),
                        "created_at": clock.now(),
                    },
                )
            )
        )
    new_id, _ = await rotate_data_key(db, keyring.kek)
    await keyring.refresh()
    done = await reencrypt(db, keyring, batch=2)
    assert done == {
        "messages.raw": 3,
        "messages.canonical": 3,
        "source_notifications.payload": 1,
        "consents.resource": 0,  # no consent recorded in this test
        "deviations.answer": 0,  # no deviation answered in this test
    }
    for mid in old:
        assert await _dek_of(db, mid) == new_id
        canonical_text = await _stored(db, "canonical", mid)
        assert envelope.dek_id_of(envelope.from_text(str(canonical_text)) or b"") == new_id
    async with db.read() as conn:
        raws = (await conn.execute(select(messages.c.raw))).scalars().all()
        payload = (await conn.execute(select(source_notifications.c.payload))).scalar_one()
    assert set(raws) == {SECRET} and payload == SECRET
    assert await reencrypt(db, keyring) == dict.fromkeys(done, 0)  # nothing left to do


async def test_kek_rotation_rewraps_every_key_and_other_processes_follow(
    db: Database, tmp_path: Path
) -> None:
    path = tmp_path / "keys" / "kek.key"
    kek = LocalKek.from_file(path)
    fixture_keyring = columns.current()
    async with db.transaction() as conn:  # start this database over with the file's KEK
        await conn.execute(data_keys.delete())
    keyring = Keyring(db, kek)
    await keyring.start()
    columns.install(keyring)
    try:
        mid = await _accept(Pipeline(db), 10)
        running = Keyring(db, LocalKek.from_file(path), cache_seconds=0)  # another process
        await running.refresh(strict=True)
        first_kek = kek.key_id

        done = await rotate_local_kek(db, kek)
        assert done.old_ids == [first_kek] and done.rewrapped == 1
        assert done.new_id == kek.key_id != first_kek
        assert len(parse_keys(path.read_text())) == 1  # the old KEK is no longer needed
        async with db.read() as conn:
            assert set((await conn.execute(select(data_keys.c.kek_id))).scalars()) == {done.new_id}

        # A data key made after the rotation is wrapped under the new KEK; the running
        # process has only the old KEK in memory and re-reads the file when it meets it.
        new_id, _ = await rotate_data_key(db, kek)
        await running.refresh(strict=True)
        assert running.active_key_id == new_id and running.kek.key_id == done.new_id
        # A process started now has only the new KEK, and reads everything.
        fresh = Keyring(db, LocalKek.from_file(path))
        await fresh.start()
        columns.install(fresh)
        async with db.read() as conn:
            row = (await conn.execute(select(messages.c.raw).where(messages.c.id == mid))).one()
        assert row.raw == SECRET
        # Without the KEK a process does not start (and says which KEK it lacks).
        with pytest.raises(KeyUnavailable, match=done.new_id):
            await Keyring(db, LocalKek.generate()).start()
    finally:
        columns.install(fixture_keyring)


def test_keyer_is_unchanged() -> None:
    """Kafka keys stay HMAC pseudonyms (decision 0001): not encrypted, never plaintext."""
    assert KEYER.key("personnummer", PNR) == KEYER.key("personnummer", PNR)
    assert PNR not in KEYER.key("personnummer", PNR)
