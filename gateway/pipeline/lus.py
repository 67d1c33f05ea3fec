"""Is a message a LUS case, and which needs does the patient have after discharge?

Only patients judged to need support from social services and/or primary care after
discharge are LUS cases (001:2599-2602); notices about everyone else make work for the
receivers (001:2647-2653). The judgement is the sender's (TakeCare's ZLU segment,
docs/decisions/0017-lus-cases-and-needs.md) and holds for the stay: a message that judges
nothing takes the stay's latest judgement, and a stay never judged is a LUS case with both
needs on a feed of LUS cases only, and no LUS case on a feed of every admission.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.model.bundle import EJ_BEDOMD, INGA_BEHOV, LUS_NEEDS, BundleView, read_bundle
from gateway.store.tables import messages

NOT_LUS = "not-lus"  # the message status of a patient who is no LUS case
NOT_LUS_REASON = "Inte ett LUS-ärende: patienten bedöms inte behöva insatser efter utskrivning"


def judged(needs: frozenset[str] | None) -> bool:
    """Whether a message's need codes judge the patient (``ej-bedomd`` and none do not)."""
    return bool(needs) and needs != {EJ_BEDOMD}


async def needs_of(
    conn: AsyncConnection,
    view: BundleView,
    key: str,
    message_id: str,
    episode_key: str | None,
    received_at: datetime,
) -> frozenset[str]:
    """The patient's needs after discharge as of this message; empty: not a LUS case.
    ``key`` is the patient's key (the stay's messages are found through its index)."""
    needs = view.lus_needs
    if not judged(needs) and episode_key:
        needs = await _stay_judgement(conn, key, message_id, episode_key, received_at) or needs
    if needs is None:  # never judged, on a feed of LUS cases only: as before markers
        return frozenset(LUS_NEEDS)
    if INGA_BEHOV in needs or not judged(needs):
        return frozenset()
    return needs


async def _stay_judgement(
    conn: AsyncConnection, key: str, message_id: str, episode_key: str, received_at: datetime
) -> frozenset[str] | None:
    """The latest judgement an earlier message of the stay carried, if any did."""
    rows = await conn.execute(
        select(messages.c.canonical)
        .where(
            messages.c.patient_key == key,
            messages.c.episode_key == episode_key,
            messages.c.id != message_id,
            messages.c.received_at <= received_at,
        )
        .order_by(messages.c.received_at.desc())
    )
    for (canonical,) in rows:
        needs = read_bundle(json.loads(canonical)).lus_needs
        if judged(needs):
            return needs
    return None
