"""Two pipeline workers on the same topics: a consumer-group rebalance mid-stream (a second
worker joins, then the first is killed) loses no delivery and duplicates none."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select

from gateway.demo import admission
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts, messages, receipt_events
from tests.support import (
    ON_BOTH_BROKERS,
    AnyBroker,
    GatewayProcess,
    now_sthlm,
    personnummer,
    wait_for,
)
from tests.test_e2e_path import msa, send

pytestmark = pytest.mark.slow
PIPELINE = "consent,route,deliver,receipts,relay"


async def _tally(url: str) -> dict[str, object]:
    db = Database(url)
    try:
        async with db.read() as conn:
            sent = (await conn.execute(select(func.count()).select_from(messages))).scalar_one()
            unrouted = (
                await conn.execute(
                    select(func.count()).where(messages.c.status.in_(["accepted", "permitted"]))
                )
            ).scalar_one()
            states = Counter(
                dict(
                    (
                        await conn.execute(
                            select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
                        )
                    ).all()
                )  # type: ignore[arg-type]
            )
            sends = (
                await conn.execute(
                    select(delivery_attempts.c.delivery_id, func.count())
                    .where(delivery_attempts.c.outcome == "delivered")
                    .group_by(delivery_attempts.c.delivery_id)
                )
            ).all()
            delivered_receipts = (
                await conn.execute(
                    select(func.count()).where(receipt_events.c.state == "delivered")
                )
            ).scalar_one()
    finally:
        await db.close()
    return {
        "messages": sent,
        "unrouted": unrouted,
        "states": states,
        "sends": Counter(n for _, n in sends),
        "delivered_receipts": delivered_receipts,
    }


def tally(url: str) -> dict[str, object]:
    return asyncio.run(_tally(url))


@ON_BOTH_BROKERS
def test_a_rebalance_mid_stream_loses_and_duplicates_nothing(
    tmp_path,
    database_url: str,
    broker: AnyBroker,
) -> None:
    front = GatewayProcess(
        tmp_path / "front",
        database_url,
        broker,
        command=("worker", "--stages", "intake,relay,reconcile,api"),
    )
    first = GatewayProcess(
        tmp_path / "w1", database_url, broker, command=("worker", "--stages", PIPELINE)
    )
    second = GatewayProcess(
        tmp_path / "w2", database_url, broker, command=("worker", "--stages", PIPELINE)
    )
    front.start()
    for worker in (first, second):  # processes of one gateway share its keys
        shutil.copytree(front.data_dir / "keys", worker.data_dir / "keys")
    first.start()
    total = 90
    answers: list[str] = []

    def feed(numbers: range) -> None:
        for n in numbers:
            ack = send(front, admission(f"REB-{n}", now_sthlm(), pnr=personnummer(100 + n)))
            answers.append(msa(ack)[1])

    try:
        feed(range(0, 30))
        second.start()  # the group rebalances while messages keep coming
        feeder = threading.Thread(target=feed, args=(range(30, 60),))
        feeder.start()
        feeder.join()
        feeder = threading.Thread(target=feed, args=(range(60, total),))
        feeder.start()
        first.kill()  # mid-stream, without a goodbye: its partitions move to the second
        feeder.join()
        assert answers == ["AA"] * total

        def settled() -> dict[str, object] | None:
            t = tally(database_url)
            states = t["states"]
            assert isinstance(states, Counter)
            open_ = sum(n for s, n in states.items() if s in ("accepted", "routed"))
            ready = t["messages"] == total and t["unrouted"] == 0 and open_ == 0
            return t if ready else None

        done = wait_for(settled, timeout=90, interval=0.5, what="every delivery settled")
        states = done["states"]
        assert isinstance(states, Counter)
        # The demo admission has the same recipients every time: each got exactly one.
        assert set(states) == {"delivered"}, states
        per_message = states["delivered"] / total
        assert per_message == int(per_message) and per_message >= 1
        assert done["sends"] == Counter({1: states["delivered"]})  # each sent exactly once
        assert done["delivered_receipts"] == states["delivered"]
        assert '"stage.started"' in second.logs()
    finally:
        for gw in (front, second):
            gw.stop()
