"""Monthly statistics per municipality and city district (counts and figures, no patient data)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from gateway.api.openapi import example
from gateway.api.policy import Grant, allow
from gateway.pipeline.stats import Month, MonthError, monthly

router = APIRouter(tags=["statistics"])
Readers = Annotated[Grant, Depends(allow("stats.read"))]

EXAMPLE_STATS = {
    "month": "2026-11",
    "time_zone": "Europe/Stockholm",
    "from": "2026-11-01T00:00:00+01:00",
    "until": "2026-12-01T00:00:00+01:00",
    "municipality": "0180",
    "groups": [
        {
            "municipality": "0180",
            "district": "Skärholmen",
            "notices_acknowledged_in_time": {
                "in_time": 41,
                "due": 45,
                "pending": 0,
                "share": 0.9111,
            },
            "minutes_to_read": {"read": 118, "median": 23.5},
            "sip_invited_within_3_days": {
                "in_time": 17,
                "stays": 19,
                "pending": 0,
                "share": 0.8947,
            },
            "days_ready_to_discharge": {"stays": 18, "days": 27, "average": 1.5},
            "deliveries_by_channel": {"fax": 6, "fhir": 40, "inbox": 74},
            "fallbacks": 5,
            "escalations": 3,
            "deviations": {"open": 1, "answered": 2},
        }
    ],
    "not_lus_messages": None,
}


@router.get(
    "/api/v1/stats",
    summary="Monthly figures per municipality and city district",
    responses=example(
        EXAMPLE_STATS,
        {
            401: "No valid bearer token.",
            403: "The token's role is neither ops nor auditor.",
            422: "month is missing, not YYYY-MM or outside 2000-2999, or municipality is "
            "empty or too long.",
        },
    ),
)
async def get_stats(
    request: Request,
    who: Readers,
    month: Annotated[
        str,
        Query(
            description="Calendar month in Stockholm time, YYYY-MM (years 2000-2999).",
            examples=["2026-11"],
            # documented, not enforced here: Month.parse answers with its own message
            json_schema_extra={"pattern": r"^\d{4}-(0[1-9]|1[0-2])$"},
        ),
    ],
    municipality: Annotated[
        str | None,
        Query(
            description="Only this municipality (its code as in the directory, e.g. 0180).",
            min_length=1,
            max_length=20,
            examples=["0180"],
        ),
    ] = None,
) -> dict[str, Any]:
    """Per (municipality, district): notices acknowledged in time, the median minutes from
    delivered to read, SIP invitations within 3 calendar days of ready-for-discharge, calendar
    days from ready-for-discharge to discharge (day 0 included, as the payment model counts),
    deliveries per channel, fallbacks, escalations and deviations. docs/operations.md,
    "Statistics", says how each is counted."""
    try:
        chosen = Month.parse(month)
    except MonthError as exc:
        raise HTTPException(422, str(exc)) from None
    deadlines = getattr(request.app.state, "deadlines", None)
    async with request.app.state.db.read() as conn:
        return await monthly(conn, chosen, municipality, deadlines)
