"""Group commit in intake: concurrent messages share transactions, each keeps its own outcome."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import outbox_row
from gateway.bus.topics import Event
from gateway.model.bundle import _full_url
from gateway.pipeline.consent import accepted_event
from gateway.pipeline.intake import Intake
from gateway.store.batch import BatchWriter
from gateway.store.db import Database
from gateway.store.tables import messages, outbox
from tests.inprocess import KEYER, canonical


async def _count(db: Database, table: object) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def _accept(intake: Intake, n: int, control_id: str) -> asyncio.Task[object]:
    return asyncio.create_task(
        intake.accept(
            source="TEST|BATCH",
            control_id=control_id,
            raw=f"raw {control_id}".encode(),
            message=canonical(n),
            answer=lambda mid: f"ACK {control_id} {mid}".encode(),
        )
    )


async def test_concurrent_accepts_share_commits_and_all_land(db: Database) -> None:
    commits: list[int] = []
    db.on_commit(lambda: commits.append(1))
    intake = Intake(db, KEYER)
    results = await asyncio.gather(*(_accept(intake, i, f"B{i:03d}") for i in range(40)))

    assert len({r.message_id for r in results}) == 40 and not any(r.duplicate for r in results)
    assert await _count(db, messages) == 40 and await _count(db, outbox) == 40
    # 40 messages arrived together: far fewer transactions than messages.
    assert 1 <= len(commits) <= 5, commits
    async with db.read() as conn:
        rows = (await conn.execute(select(messages.c.id, messages.c.ack))).all()
        events = (await conn.execute(select(outbox.c.payload).order_by(outbox.c.id))).scalars()
        accepted = [Event.from_json(p).message_id for p in events]
    # Every message has its own answer and exactly one accepted event.
    assert {r.id: r.ack for r in rows} == {r.message_id: r.answer for r in results}
    assert sorted(accepted) == sorted(r.message_id for r in results)


async def test_a_duplicate_in_a_batch_costs_the_others_nothing(db: Database) -> None:
    intake = Intake(db, KEYER)
    first = await _accept(intake, 1, "DUP-1")
    batch = [_accept(intake, i, f"NEW-{i}") for i in range(2, 8)]
    batch.insert(3, _accept(intake, 1, "DUP-1"))  # a resend racing new messages
    results = await asyncio.gather(*batch)

    resend = results[3]
    assert resend.duplicate and resend.message_id == first.message_id
    assert resend.answer == first.answer
    assert not any(r.duplicate for i, r in enumerate(results) if i != 3)
    assert await _count(db, messages) == 7 and await _count(db, outbox) == 7


async def test_a_message_the_database_refuses_fails_alone(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    intake = Intake(db, KEYER)
    good = [_accept(intake, i, f"OK-{i}") for i in range(4)]
    bad = _accept(intake, 9, "X" * 300)  # control_id is VARCHAR(200) (SQLite ignores lengths)
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], Exception)
    assert not any(isinstance(r, BaseException) for r in results[:-1])
    assert await _count(db, messages) == 4 and await _count(db, outbox) == 4


async def test_batch_writer_is_all_or_nothing(db: Database) -> None:
    writer = BatchWriter(db)
    now = clock.now()

    def pair(control_id: str) -> tuple[dict[str, object], dict[str, object]]:
        mid = str(uuid.uuid4())
        row = {
            "id": mid,
            "source": "TEST|ATOMIC",
            "control_id": control_id,
            "event": "inskrivningsmeddelande",
            "patient_key": "k" * 32,
            "episode_key": None,
            "raw": b"raw",
            "canonical": json.dumps({"id": mid}),
            "ack": b"ack",
            "status": "accepted",
            "received_at": now,
            "updated_at": now,
        }
        return row, outbox_row(topics.EVENTS, "k" * 32, accepted_event(mid))

    pairs = [pair(c) for c in ("A", "B", "A")]  # the third repeats the first: unique violation
    with pytest.raises(IntegrityError):
        await writer.write([p[0] for p in pairs], [p[1] for p in pairs])
    assert await _count(db, messages) == 0 and await _count(db, outbox) == 0

    await writer.write([pairs[0][0], pairs[1][0]], [pairs[0][1], pairs[1][1]])
    assert await _count(db, messages) == 2 and await _count(db, outbox) == 2


@given(st.text(min_size=1, max_size=40), st.sampled_from(["Patient", "Encounter", "CarePlan"]))
def test_full_url_is_uuid5_of_the_resource_name(message_id: str, kind: str) -> None:
    resource = {"resourceType": kind, "id": "x1"}
    expected = uuid.uuid5(uuid.NAMESPACE_URL, f"{message_id}/{kind}/x1")
    assert _full_url(message_id, resource) == f"urn:uuid:{expected}"
