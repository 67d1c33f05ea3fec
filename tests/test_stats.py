"""Monthly statistics: a month of rows written straight into the store, exact figures out.

The rows are written directly (not through the pipeline) so each time is chosen: the clock
edges (an acknowledgement exactly at its due time, a SIP invitation at 23:00 on day 3 and one
on day 4) and the month edges in Stockholm time (23:30 local on 30 November is November; 00:30
local on 1 December, still 30 November in UTC, is December).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.clock import STOCKHOLM
from gateway.crypto.columns import seal_row
from gateway.model.events import LusEvent as E
from gateway.pipeline.stats import Month, MonthError, Stay, monthly
from gateway.store.db import Database
from gateway.store.tables import (
    deliveries,
    delivery_attempts,
    deviations,
    lus_clocks,
    lus_event_times,
    messages,
    receipt_events,
)

STHLM, HUDDINGE = "0180", "0126"
SKH, SOD = "Skärholmen", "Södermalm"
NOV = Month(2026, 11)
_ids = itertools.count(1)


def local(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A time in Stockholm (in November and December: UTC+1)."""
    return datetime(2026, month, day, hour, minute, tzinfo=STOCKHOLM)


def nov(day: int, hour: int, minute: int = 0) -> datetime:
    return local(11, day, hour, minute)


class Rows:
    """Writes the tables' rows with chosen times, as the pipeline and follow-up would."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def message(self, event: str, stay: str, at: datetime) -> str:
        mid = f"m-{next(_ids)}"
        row = {
            "id": mid,
            "source": "TAKECARE|SE2321000016-H001",
            "control_id": mid,
            "event": event,
            "patient_key": f"pk-{stay}",
            "episode_key": f"ep-{stay}",
            "raw": b"MSH|...",
            "canonical": "{}",
            "status": "complete",
            "occurred_at": at,
            "received_at": at + timedelta(seconds=5),
            "updated_at": at + timedelta(seconds=5),
        }
        await self.conn.execute(insert(messages).values(**seal_row(messages, row)))
        return mid

    async def delivery(
        self,
        message_id: str,
        town: str | None,
        district: str | None = None,
        *,
        channel: str | None = "inbox",
        created: datetime | None = None,
        due: datetime | None = None,
        for_information: bool = False,
        escalated_from: str | None = None,
    ) -> str:
        did = f"d-{next(_ids)}"
        created = created or (due - timedelta(days=1) if due else nov(1, 12))
        await self.conn.execute(
            insert(deliveries).values(
                id=did,
                message_id=message_id,
                recipient_hsa_id=f"SE5566778899-X{next(_ids)}",
                recipient_name="Enhet",
                role="escalation" if escalated_from else "hemtjanst",
                for_information=for_information,
                channel=channel,
                state="delivered",
                created_at=created,
                updated_at=created,
                municipality=town,
                district=district,
                due_at=due,
                escalated_from=escalated_from,
                escalation_level=1 if escalated_from else 0,
            )
        )
        return did

    async def receipt(self, delivery_id: str, state: str, at: datetime) -> None:
        await self.conn.execute(
            insert(receipt_events).values(delivery_id=delivery_id, state=state, at=at)
        )

    async def attempt(self, delivery_id: str, channel: str, outcome: str, at: datetime) -> None:
        await self.conn.execute(
            insert(delivery_attempts).values(
                delivery_id=delivery_id, channel=channel, attempt=1, at=at, outcome=outcome
            )
        )

    async def deviation(
        self,
        message_id: str,
        town: str,
        district: str | None,
        raised: datetime,
        answered: datetime | None = None,
    ) -> None:
        await self.conn.execute(
            insert(deviations).values(
                id=f"v-{next(_ids)}",
                message_id=message_id,
                patient_key="pk",
                kind="missed-receipt",
                responsible_hsa_id="SE2120001637-B020",
                municipality=town,
                district=district,
                status="answered" if answered else "open",
                raised_at=raised,
                answered_at=answered,
                summary="Kvittens saknas",
            )
        )

    async def stay(self, name: str, places: list[tuple[str, str | None]], *events: Any) -> str:
        """A stay's messages, each delivered (for information, no clock) to every place."""
        first = ""
        for event, at in events:
            mid = await self.message(event, name, at)
            first = first or mid
            for town, district in places:
                await self.delivery(
                    mid, town, district, channel=None, created=at, for_information=True
                )
        return first


async def write_month(db: Database) -> None:
    async with db.transaction() as conn:
        rows = Rows(conn)
        notice = await rows.message(E.INSKRIVNINGSMEDDELANDE, "notices", nov(8, 9))

        # Skärholmen: five notices due in November; three acknowledged at or before due.
        due = nov(10, 12)
        d1 = await rows.delivery(notice, STHLM, SKH, due=due)
        d2 = await rows.delivery(notice, STHLM, SKH, due=due)
        d3 = await rows.delivery(notice, STHLM, SKH, due=due, channel="fax")
        d4 = await rows.delivery(notice, STHLM, SKH, due=nov(12, 9), channel="fhir")
        d8 = await rows.delivery(notice, STHLM, SKH, due=nov(30, 23, 30))  # 22:30 UTC: Nov
        d7 = await rows.delivery(  # due 1 Dec 00:30 local (30 Nov 23:30 UTC): December
            notice, STHLM, SKH, due=local(12, 1, 0, 30), created=local(12, 1, 0, 10)
        )
        await rows.receipt(d1, "acknowledged", nov(10, 11))
        await rows.receipt(d2, "acknowledged", due)  # exactly at the due time: in time
        await rows.receipt(d3, "acknowledged", nov(10, 12, 1))  # a minute late
        await rows.receipt(d8, "acknowledged", nov(30, 23, 25))
        await rows.receipt(d7, "acknowledged", local(12, 1, 0, 20))
        # Not counted: a copy for information, and the escalation of d3 (counted as such).
        await rows.delivery(notice, STHLM, SKH, for_information=True)
        await rows.delivery(
            notice, STHLM, SKH, due=nov(10, 16), escalated_from=d3, created=nov(10, 12, 5)
        )
        # Minutes from delivered to read: 10, 20, 30, 50 and 40: median 30 (d7, delivered
        # in December, read after 1 minute, would make it 25).
        for d, minutes in ((d1, 10), (d2, 20), (d3, 30), (d4, 50)):
            await rows.receipt(d, "delivered", nov(9, 8))
            await rows.receipt(d, "read", nov(9, 8) + timedelta(minutes=minutes))
        await rows.receipt(d8, "delivered", nov(30, 22, 40))
        await rows.receipt(d8, "read", nov(30, 23, 20))
        await rows.receipt(d7, "delivered", local(12, 1, 0, 30))
        await rows.receipt(d7, "read", local(12, 1, 0, 31))
        # d3: the inbox was unavailable, so the follow-up fell back to fax; d7's fallback
        # is in December.
        await rows.attempt(d3, "inbox", "unavailable", nov(9, 7, 50))
        await rows.attempt(d3, "inbox", "fallback", nov(9, 7, 55))
        await rows.attempt(d3, "fax", "delivered", nov(9, 8))
        await rows.attempt(d7, "inbox", "fallback", local(12, 1, 0, 25))
        await rows.deviation(notice, STHLM, SKH, nov(11, 9))
        await rows.deviation(notice, STHLM, SKH, nov(12, 9), answered=nov(13, 10))

        # Södermalm: one notice, acknowledged in time; a deviation raised 23:30 on 30 Nov.
        d9 = await rows.delivery(notice, STHLM, SOD, due=nov(20, 12))
        await rows.receipt(d9, "acknowledged", nov(20, 8))
        await rows.deviation(notice, STHLM, SOD, nov(30, 23, 30), answered=local(12, 2, 9))

        # Huddinge (no districts): one notice, acknowledged late, by letter after a fallback;
        # escalated to the ward (a recipient with no municipality: counted for Huddinge).
        d10 = await rows.delivery(notice, HUDDINGE, due=nov(5, 12), channel="letter")
        await rows.receipt(d10, "acknowledged", nov(6, 12))
        await rows.attempt(d10, "fax", "fallback", nov(4, 13))
        await rows.delivery(notice, None, escalated_from=d10, created=nov(5, 13))
        await rows.deviation(notice, HUDDINGE, None, local(12, 1, 0, 30))  # December

        # Stays. A: ready Friday 13th, SIP on day 3 at 23:00 (in time), discharged Monday
        # 16th: 13, 14, 15, 16 = 4 days with the weekend. Also seen by a unit of the city
        # without a district: counted in Skärholmen only.
        await rows.stay(
            "A",
            [(STHLM, SKH), (STHLM, None)],
            (E.UTSKRIVNINGSKLAR, nov(13, 10)),
            (E.UTSKRIVNINGSMEDDELANDE, nov(16, 14)),
            (E.KALLELSE_SIP, nov(16, 23)),
        )
        # B: ready Tuesday 17th, SIP on day 4 (late), discharged 24th: 8 days.
        await rows.stay(
            "B",
            [(STHLM, SKH)],
            (E.UTSKRIVNINGSKLAR, nov(17, 9)),
            (E.KALLELSE_SIP, nov(21, 8)),
            (E.UTSKRIVNINGSMEDDELANDE, nov(24, 11)),
        )
        # C: ready 23:30 on 30 Nov (November), SIP on 2 Dec (in time), discharged December.
        await rows.stay(
            "C",
            [(STHLM, SOD)],
            (E.UTSKRIVNINGSKLAR, nov(30, 23, 30)),
            (E.UTSKRIVNINGSMEDDELANDE, local(12, 1, 10)),
            (E.KALLELSE_SIP, local(12, 2, 9)),
        )
        # D: ready in October, discharged 2 Nov: 30, 31 Oct, 1, 2 Nov = 4 days.
        await rows.stay(
            "D",
            [(STHLM, SOD)],
            (E.UTSKRIVNINGSKLAR, local(10, 30, 15)),
            (E.KALLELSE_SIP, local(10, 31, 9)),
            (E.UTSKRIVNINGSMEDDELANDE, nov(2, 10)),
        )
        # E: ready 00:30 on 1 Dec (30 Nov in UTC): December, nothing in November.
        await rows.stay(
            "E",
            [(HUDDINGE, None)],
            (E.UTSKRIVNINGSKLAR, local(12, 1, 0, 30)),
            (E.UTSKRIVNINGSMEDDELANDE, local(12, 2, 12)),
        )
        # F: ready and discharged the same day: 1 day (day 0 counts); no SIP invitation.
        await rows.stay(
            "F",
            [(HUDDINGE, None)],
            (E.UTSKRIVNINGSKLAR, nov(5, 8)),
            (E.UTSKRIVNINGSMEDDELANDE, nov(5, 16)),
        )
        # G: ready on the 9th, cancelled, ready again on the 12th: the clocks start on the
        # 12th, so the SIP of the 15th is in time and the stay is 12-13 Nov = 2 days.
        await rows.stay(
            "G",
            [(HUDDINGE, None)],
            (E.UTSKRIVNINGSKLAR, nov(9, 10)),
            (E.MAKULERA_UTSKRIVNINGSKLAR, nov(10, 10)),
            (E.UTSKRIVNINGSKLAR, nov(12, 10)),
            (E.KALLELSE_SIP, nov(15, 20)),
            (E.UTSKRIVNINGSMEDDELANDE, nov(13, 15)),
        )


def group(
    town: str,
    district: str | None,
    ack: tuple[int, int],
    read: tuple[int, float | None],
    sip: tuple[int, int],
    days: list[int],
    channels: dict[str, int],
    fallbacks: int,
    escalations: int,
    deviations: tuple[int, int],
    exempt: list[int] | None = None,
) -> dict[str, Any]:
    exempt = exempt or []
    payable = list(days)
    for d in exempt:
        payable.remove(d)
    return {
        "municipality": town,
        "district": district,
        "notices_acknowledged_in_time": {
            "in_time": ack[0],
            "due": ack[1],
            "pending": 0,
            "share": round(ack[0] / ack[1], 4) if ack[1] else None,
        },
        "minutes_to_read": {"read": read[0], "median": read[1]},
        "sip_invited_within_3_days": {
            "in_time": sip[0],
            "stays": sip[1],
            "pending": 0,
            "share": round(sip[0] / sip[1], 4) if sip[1] else None,
        },
        "days_ready_to_discharge": {
            **days_figure(days),
            "exempt_no_sip": days_figure(exempt),
            "payable": days_figure(payable),
        },
        "deliveries_by_channel": channels,
        "fallbacks": fallbacks,
        "escalations": escalations,
        "on_call_at_once": 0,
        "deviations": {"open": deviations[0], "answered": deviations[1]},
        "clocks": {},
    }


def days_figure(days: list[int]) -> dict[str, Any]:
    return {
        "stays": len(days),
        "days": sum(days),
        "average": round(sum(days) / len(days), 2) if days else None,
    }


HUDDINGE_NOV = group(HUDDINGE, None, (0, 1), (0, None), (1, 2), [1, 2], {"letter": 1}, 1, 1, (0, 0))
SKH_NOV = group(
    STHLM,
    SKH,
    (3, 5),
    (5, 30.0),
    (1, 2),
    [4, 8],
    {"fax": 1, "fhir": 1, "inbox": 5},
    1,
    1,
    (1, 1),
    exempt=[8],  # stay B: no SIP called by the end of day 3, still in hospital (001:1525)
)
SOD_NOV = group(STHLM, SOD, (1, 1), (0, None), (1, 1), [4], {"inbox": 1}, 0, 0, (0, 1))
AFTER = local(12, 20, 12)  # every clock of November has run out


async def test_a_month_of_figures_per_municipality_and_district(db: Database) -> None:
    await write_month(db)
    async with db.read() as conn:
        figures = await monthly(conn, NOV, now=AFTER)
    assert figures["month"] == "2026-11"
    assert figures["from"] == "2026-11-01T00:00:00+01:00"
    assert figures["until"] == "2026-12-01T00:00:00+01:00"
    assert figures["groups"] == [HUDDINGE_NOV, SKH_NOV, SOD_NOV]


async def test_municipality_filter_and_december(db: Database) -> None:
    await write_month(db)
    async with db.read() as conn:
        huddinge = await monthly(conn, NOV, HUDDINGE, now=AFTER)
        city = await monthly(conn, NOV, STHLM, now=AFTER)
        december = await monthly(conn, Month(2026, 12), now=AFTER)
    assert huddinge["groups"] == [HUDDINGE_NOV] and huddinge["municipality"] == HUDDINGE
    assert city["groups"] == [SKH_NOV, SOD_NOV]
    by_place = {(g["municipality"], g["district"]): g for g in december["groups"]}
    # December: the notice due at 00:30 on the 1st, stay C's discharge (1 Dec 10:00, ready
    # 30 Nov: 2 days), stay E (ready 00:30 on the 1st, discharged the 2nd: 2 days, no SIP).
    skh = by_place[(STHLM, SKH)]
    assert skh["notices_acknowledged_in_time"]["due"] == 1
    assert skh["minutes_to_read"] == {"read": 1, "median": 1.0}
    assert skh["fallbacks"] == 1
    assert by_place[(STHLM, SOD)]["days_ready_to_discharge"]["days"] == 2
    hud = by_place[(HUDDINGE, None)]
    assert hud["sip_invited_within_3_days"] == {
        "in_time": 0,
        "stays": 1,
        "pending": 0,
        "share": 0.0,
    }
    assert hud["days_ready_to_discharge"] == {
        **days_figure([2]),
        "exempt_no_sip": days_figure([]),  # discharged before its SIP was due
        "payable": days_figure([2]),
    }
    assert hud["deviations"] == {"open": 1, "answered": 0}


async def test_clocks_still_running_are_pending(db: Database) -> None:
    await write_month(db)
    async with db.read() as conn:
        early = await monthly(conn, NOV, now=nov(7, 9))
    by_place = {(g["municipality"], g["district"]): g for g in early["groups"]}
    # At 09:00 on 7 Nov: d4 (due on the 12th) is not acknowledged yet; stay F has no SIP
    # invitation and its clock runs until the end of the 8th. Stay B's invitation came late:
    # late, not pending.
    assert by_place[(STHLM, SKH)]["notices_acknowledged_in_time"]["pending"] == 1
    assert by_place[(STHLM, SKH)]["sip_invited_within_3_days"]["pending"] == 0
    assert by_place[(HUDDINGE, None)]["sip_invited_within_3_days"]["pending"] == 1


def test_days_count_day_zero_and_the_stockholm_date() -> None:
    same_day = Stay(ready_at=nov(5, 8), discharged_at=nov(5, 16))
    weekend = Stay(ready_at=nov(13, 23, 30), discharged_at=nov(16, 0, 10))
    # 23:30 UTC on 30 Nov is already 1 Dec in Stockholm: ready and discharged the same day.
    utc_edge = Stay(ready_at=local(12, 1, 0, 30), discharged_at=local(12, 1, 23))
    assert [s.days_ready() for s in (same_day, weekend, utc_edge)] == [1, 4, 1]
    assert Stay(ready_at=nov(5, 8)).days_ready() is None


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "26-11", "2026-11-01", "nov", ""])
def test_month_must_be_yyyy_mm(text: str) -> None:
    with pytest.raises(MonthError, match="YYYY-MM"):
        Month.parse(text)
    assert Month.parse("2026-12").next_first_day.isoformat() == "2027-01-01"


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
async def client(db: Database, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c, keys


def bearer(keys: TokenKeys, role: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue("SE2321000016-OPS1", role, "Eva Ek")}


async def test_stats_endpoint(db: Database, client: Any) -> None:
    http, keys = client
    await write_month(db)
    url = "/api/v1/stats"
    assert (await http.get(url, params={"month": "2026-11"})).status_code == 401
    for role in ("staff", "integration"):
        r = await http.get(url, params={"month": "2026-11"}, headers=bearer(keys, role))
        assert r.status_code == 403 and "ops or auditor" in r.json()["detail"]
    for bad in ("2026-13", "november", "2026-11-01"):
        r = await http.get(url, params={"month": bad}, headers=bearer(keys, "ops"))
        assert r.status_code == 422 and "YYYY-MM" in str(r.json()["detail"]), bad
    r = await http.get(url, headers=bearer(keys, "ops"))
    assert r.status_code == 422  # month is required

    # The clocks run on the real time here; every November clock in these rows is over by
    # the time this test can run (23 Nov 2026 or later), except what is acknowledged.
    r = await http.get(url, params={"month": "2026-11"}, headers=bearer(keys, "auditor"))
    assert r.status_code == 200
    assert r.json()["groups"] == [HUDDINGE_NOV, SKH_NOV, SOD_NOV]
    r = await http.get(
        url, params={"month": "2026-11", "municipality": HUDDINGE}, headers=bearer(keys, "ops")
    )
    assert r.json()["groups"] == [HUDDINGE_NOV]
    # Nothing about patients: no keys, no message ids, no names.
    assert "pk-" not in r.text and "m-" not in r.text and "Enhet" not in r.text

    spec = (await http.get("/openapi.json")).json()
    op = spec["paths"]["/api/v1/stats"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["example"]["groups"]
    assert {p["name"] for p in op["parameters"]} == {"month", "municipality"}


# ------------------------------------------------- the routine's clocks (decision 0019)

BOTKYRKA = "0127"


async def write_clocks_month(db: Database) -> None:
    """Botkyrka's November: stays timed by the event itself, and the routine's clocks."""
    async with db.transaction() as conn:
        rows = Rows(conn)

        async def timed(event: str, stay: str, sent: datetime, at: datetime | None) -> str:
            mid = await rows.message(event, stay, sent)
            await conn.execute(insert(lus_event_times).values(message_id=mid, at=at))
            await rows.delivery(mid, BOTKYRKA, channel=None, created=sent, for_information=True)
            return mid

        # H: the physician's decision (EVN-6) Monday 9th 15:00, the message the 10th; the
        # discharge information as a document on the 11th (no discharge), the discharge
        # event (A03, PV1-45) on the 12th: 9, 10, 11, 12 = 4 days. SIP on the 11th.
        await timed(E.UTSKRIVNINGSKLAR, "H", nov(10, 10), nov(9, 15))
        await timed(E.UTSKRIVNINGSMEDDELANDE, "H", nov(11, 9), None)
        await timed(E.UTSKRIVNINGSMEDDELANDE, "H", nov(12, 12), nov(12, 11))
        await timed(E.KALLELSE_SIP, "H", nov(11, 10), nov(11, 10))
        # I: ready the 2nd, no SIP called by the end of the 5th, discharged the 9th: 8 days,
        # exempt from the municipality's payment (001:1525).
        await timed(E.UTSKRIVNINGSKLAR, "I", nov(2, 9), nov(2, 9))
        await timed(E.UTSKRIVNINGSMEDDELANDE, "I", nov(9, 14), nov(9, 14))
        # J: ready the 16th, the SIP offered and declined the 17th (in time).
        await timed(E.UTSKRIVNINGSKLAR, "J", nov(16, 9), nov(16, 9))
        await timed(E.SIP_AVBOJD, "J", nov(17, 9), nov(17, 9))

        first = await rows.message(E.INSKRIVNINGSMEDDELANDE, "K", nov(1, 9))

        async def clock(rule: str, status: str, due: datetime, stopped: datetime | None) -> None:
            await conn.execute(
                insert(lus_clocks).values(
                    id=f"c-{next(_ids)}",
                    episode_key=f"ep-clock-{next(_ids)}",
                    patient_key="pk",
                    rule=rule,
                    started_by=first,
                    started_at=due - timedelta(days=1),
                    due_at=due,
                    stopped_at=stopped,
                    status=status,
                    responsible_hsa_id="SE2321000016-V010",
                    municipality=BOTKYRKA,
                )
            )

        await clock("fast-vardkontakt", "met", nov(3, 9), nov(2, 16))
        await clock("fast-vardkontakt", "met", nov(4, 9), nov(4, 9))  # exactly at due: met
        await clock("fast-vardkontakt", "late", nov(4, 9), nov(6, 9))  # stopped late
        await clock("kallelse-sip", "late", nov(5, 23), None)  # ran out, never stopped
        await clock("hemtjanst-start", "running", nov(30, 23), None)  # due after "now"
        await clock("hemtjanst-start", "cancelled", nov(3, 9), None)  # nobody's obligation
        await clock("utskrivningsinformation", "late", local(12, 1, 12), None)  # December


async def test_the_routines_clocks_and_the_events_own_times(db: Database) -> None:
    await write_clocks_month(db)
    async with db.read() as conn:
        figures = await monthly(conn, NOV, BOTKYRKA, now=nov(30, 12))
    assert figures["groups"] == [
        {
            "municipality": BOTKYRKA,
            "district": None,
            "notices_acknowledged_in_time": {"in_time": 0, "due": 0, "pending": 0, "share": None},
            "minutes_to_read": {"read": 0, "median": None},
            # H (SIP day 2), I (none: late), J (declined on day 1).
            "sip_invited_within_3_days": {
                "in_time": 2,
                "stays": 3,
                "pending": 0,
                "share": 0.6667,
            },
            "days_ready_to_discharge": {
                "stays": 2,
                "days": 12,
                "average": 6.0,
                "exempt_no_sip": {"stays": 1, "days": 8, "average": 8.0},
                "payable": {"stays": 1, "days": 4, "average": 4.0},
            },
            "deliveries_by_channel": {},
            "fallbacks": 0,
            "escalations": 0,
            "on_call_at_once": 0,
            "deviations": {"open": 0, "answered": 0},
            "clocks": {
                "fast-vardkontakt": {
                    "in_time": 2,
                    "late": 1,
                    "due": 3,
                    "pending": 0,
                    "share": 0.6667,
                },
                "hemtjanst-start": {"in_time": 0, "late": 0, "due": 0, "pending": 1, "share": None},
                "kallelse-sip": {"in_time": 0, "late": 1, "due": 1, "pending": 0, "share": 0.0},
            },
        }
    ]
