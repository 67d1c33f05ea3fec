"""A care episode: versions reach everyone who had the earlier one; cancellations retract."""

from __future__ import annotations

from dataclasses import replace

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from gateway.model.events import LusEvent
from gateway.model.identifiers import parse_reservnummer
from gateway.pipeline import inbox
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages, metadata
from tests.inprocess import HOME_CARE, NIGHT, REHAB, Pipeline, canonical, parties

CLINIC = "SE2321000016-V010"


async def recipients(db: Database, message_id: str) -> dict[str, tuple[str | None, str | None]]:
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(
                    deliveries.c.recipient_hsa_id,
                    deliveries.c.superseded_by,
                    deliveries.c.retracted_by,
                ).where(deliveries.c.message_id == message_id)
            )
        ).all()
    return {r.recipient_hsa_id: (r.superseded_by, r.retracted_by) for r in rows}


async def test_versions_and_cancellations_follow_the_episode(db: Database) -> None:
    pipeline = Pipeline(db)

    async def send(event: LusEvent, control_id: str, *named: str, visit: str = "V1") -> str:
        return await pipeline.run(
            canonical(40, event=event, encounter_id=visit, parties=parties(*named)), control_id
        )

    await send(LusEvent.INSKRIVNINGSMEDDELANDE, "EP-1", HOME_CARE, REHAB)
    plan1 = await send(LusEvent.PLANERINGSUNDERLAG, "EP-2", HOME_CARE, REHAB)
    # The moved discharge date no longer names rehab: rehab had version 1, so gets version 2.
    plan2 = await send(LusEvent.PLANERINGSUNDERLAG, "EP-3", HOME_CARE)
    assert set(await recipients(db, plan2)) == {CLINIC, HOME_CARE, REHAB}
    assert {h: s for h, (s, _) in (await recipients(db, plan1)).items()} == {
        CLINIC: plan2,
        HOME_CARE: plan2,
        REHAB: plan2,
    }
    # Another stay of the same patient is another episode: nothing of V1 is superseded.
    other = await send(LusEvent.PLANERINGSUNDERLAG, "EP-4", HOME_CARE, visit="V2")
    assert set(await recipients(db, other)) == {CLINIC, HOME_CARE}
    assert all(s is None for s, _ in (await recipients(db, plan2)).values())

    discharge = await send(LusEvent.UTSKRIVNINGSMEDDELANDE, "EP-5", HOME_CARE, NIGHT)
    # The cancellation names nobody new, yet reaches all who got the discharge information.
    cancel = await send(LusEvent.MAKULERA_UTSKRIVNING, "EP-6")
    assert set(await recipients(db, cancel)) == {CLINIC, HOME_CARE, NIGHT}
    assert {h: r for h, (_, r) in (await recipients(db, discharge)).items()} == {
        CLINIC: cancel,
        HOME_CARE: cancel,
        NIGHT: cancel,
    }
    # Planning information is not what the cancellation retracts.
    assert all(r is None for _, r in (await recipients(db, plan2)).values())

    async with db.read() as conn:
        notices = await inbox.list_notices(conn, HOME_CARE)
    by_message = {n["message_id"]: n for n in notices}
    assert by_message[plan1]["notice"] == "Ersatt av en nyare version"
    assert by_message[discharge]["notice"] == "Makulerat av avsändaren"
    assert by_message[plan2]["notice"] == "" and by_message[cancel]["event"] == (
        "makulera-utskrivning"
    )


async def test_migrations_match_the_tables(db: Database) -> None:
    def diff(sync_conn):  # type: ignore[no-untyped-def]
        return compare_metadata(MigrationContext.configure(sync_conn), metadata)

    async with db.read() as conn:
        differences = await conn.run_sync(diff)
    # SQLite reports no comments; index and column differences count everywhere.
    assert [d for d in differences if "comment" not in str(d[0])] == []


async def test_a_merge_joins_the_prior_identity_and_tells_whoever_knew_it(db: Database) -> None:
    """ADT^A40: the patient was admitted on a reservnummer; the merge moves that history to
    the personnummer and reaches every party that had a notice about either identity."""
    pipeline = Pipeline(db)
    reserv = parse_reservnummer("RES-0042-2026")
    unknown = canonical(41, encounter_id="V9", parties=parties(HOME_CARE, REHAB))
    unknown.patient_ids[:] = [reserv]
    first = await pipeline.run(unknown, "MRG-1")
    known = await pipeline.run(
        canonical(42, event=LusEvent.PLANERINGSUNDERLAG, parties=parties(NIGHT)), "MRG-2"
    )
    merge = canonical(42, event=LusEvent.PATIENTSAMMANSLAGNING, parties=[])
    merge.replaces_ids.append(reserv)
    merged = await pipeline.run(merge, "MRG-3")

    assert set(await recipients(db, merged)) == {CLINIC, HOME_CARE, REHAB, NIGHT}
    async with db.read() as conn:
        keys = dict((await conn.execute(select(messages.c.id, messages.c.patient_key))).all())
        roles = dict(
            (
                await conn.execute(
                    select(deliveries.c.recipient_hsa_id, deliveries.c.for_information).where(
                        deliveries.c.message_id == merged
                    )
                )
            ).all()
        )
    assert keys[first] == keys[known] == keys[merged]  # one history now
    assert all(roles.values())  # för kännedom
    async with db.read() as conn:
        notices = {n["message_id"]: n for n in await inbox.list_notices(conn, HOME_CARE)}
    assert notices[merged]["patient"]["replaces"] == ["RES-0042-2026"]
    assert notices[merged]["event_display"] == "Patientsammanslagning"

    # A patient nobody has heard of and the message names nobody: no one to tell.
    lone = replace(
        canonical(43, event=LusEvent.PATIENTSAMMANSLAGNING, parties=[]),
        listed_clinic=None,
        replaces_ids=[parse_reservnummer("RES-0043-2026")],
    )
    lone_id = await pipeline.run(lone, "MRG-4")
    assert await recipients(db, lone_id) == {}
    assert await pipeline.status(lone_id) == "unroutable"
