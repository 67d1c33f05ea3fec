"""The directory in the database: FHIR resources, and who serves which patient.

``directory_resources`` holds the current version of every Organization, HealthcareService
and Endpoint (a deletion keeps the row as a tombstone, so versions only grow).
:func:`load` builds the :class:`~gateway.directory.Directory` from them and caches it per
database; the check that decides whether to rebuild is one aggregate over that small table
(``count`` and ``sum(version)``: every write raises the sum), so routing can call it for every
message. :func:`seed_from_file` fills an empty table from the demo TOML file or a FHIR Bundle.

``care_relations`` remembers, per patient (HMAC pseudonym) and kind of party (the routing role:
``hemtjanst``, ``hemtjanst-natt``, ``sabo``, ``listed-clinic``, …), which unit serves the
patient: :func:`remember` records what a message says, :func:`providers` answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.directory import Directory, DirectoryError
from gateway.directory.fhir import (
    TYPES,
    DirectoryInvalid,
    Parsed,
    Ref,
    from_resources,
    parse,
    to_resources,
)
from gateway.store.db import advisory_xact_lock
from gateway.store.tables import care_relations, directory_resources

log = structlog.get_logger("brygga.directory")
DIRECTORY_LOCK = 7_264_006  # PostgreSQL advisory lock: seeding and writing the directory
T = directory_resources


@dataclass(frozen=True, slots=True)
class StoredResource:
    type: str
    id: str
    version: int
    deleted: bool
    resource: dict[str, Any]
    updated_at: datetime


def _stored(row: Any) -> StoredResource:
    return StoredResource(
        row.resource_type,
        row.id,
        row.version,
        row.deleted,
        json.loads(row.resource),
        row.updated_at,
    )


# --------------------------------------------------------------------------- loading


class DirectoryCache:
    """The Directory built from the store, rebuilt only when the store changed."""

    def __init__(self) -> None:
        self._by_db: dict[str, tuple[tuple[int, int], Directory]] = {}

    async def load(self, conn: AsyncConnection) -> Directory:
        stamp_row = (
            await conn.execute(select(func.count(), func.coalesce(func.sum(T.c.version), 0)))
        ).one()
        stamp = (int(stamp_row[0]), int(stamp_row[1]))
        key = str(conn.engine.url)
        cached = self._by_db.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        rows = (await conn.execute(select(T.c.resource).where(T.c.deleted.is_(False)))).all()
        directory = from_resources(json.loads(r.resource) for r in rows)
        try:
            directory.check()
        except DirectoryError as exc:  # written concurrently past each other's checks
            log.warning("directory.dangling_reference", problem=str(exc))
        self._by_db[key] = (stamp, directory)
        return directory


cache = DirectoryCache()


async def load(conn: AsyncConnection) -> Directory:
    """The current directory (cached; costs one small aggregate when nothing changed)."""
    return await cache.load(conn)


# --------------------------------------------------------------------------- resources


class StoredDirectory:
    """The directory as stored now (a :class:`~gateway.directory.DirectorySource`): what
    routing, delivery and escalation read, per message, through the cache of :func:`load`."""

    async def current(self, conn: AsyncConnection) -> Directory:
        return await load(conn)


async def get(conn: AsyncConnection, rtype: str, rid: str) -> StoredResource | None:
    row = (
        await conn.execute(select(T).where(T.c.resource_type == rtype, T.c.id == rid))
    ).one_or_none()
    return _stored(row) if row else None


async def search(
    conn: AsyncConnection, rtype: str, *, hsa_id: str | None = None, organization: str | None = None
) -> list[StoredResource]:
    query = select(T).where(T.c.resource_type == rtype, T.c.deleted.is_(False))
    if hsa_id is not None:
        query = query.where(T.c.hsa_id == hsa_id)
    if organization is not None:
        query = query.where(T.c.organization_id == organization)
    rows = (await conn.execute(query.order_by(T.c.id))).all()
    return [_stored(r) for r in rows]


async def _alive(conn: AsyncConnection) -> list[StoredResource]:
    rows = (await conn.execute(select(T).where(T.c.deleted.is_(False)))).all()
    return [_stored(r) for r in rows]


async def _resolve(conn: AsyncConnection, ref: Ref) -> bool:
    cond = [T.c.resource_type == ref.type, T.c.deleted.is_(False)]
    cond.append(T.c.hsa_id == ref.hsa_id if ref.hsa_id else T.c.id == ref.id)
    return (await conn.execute(select(func.count()).where(*cond))).scalar_one() > 0


def _missing(ref: Ref) -> DirectoryInvalid:
    what = f"a unit with HSA-id {ref.hsa_id}" if ref.hsa_id else f"{ref.type}/{ref.id}"
    return DirectoryInvalid(ref.path, f"{what} is not in the directory", "not-found")


def _refers_to(parsed: Parsed, target: StoredResource, hsa_id: str | None, by_id: bool) -> bool:
    return any(
        (by_id and r.type == target.type and r.id == target.id)
        or (hsa_id is not None and r.hsa_id == hsa_id)
        for r in parsed.refs
    )


async def referrers(
    conn: AsyncConnection, target: StoredResource, hsa_id: str | None, *, by_id: bool = True
) -> list[str]:
    """``Type/id`` of the live resources that refer to ``target`` (by id unless ``by_id`` is
    false, and by its HSA-id)."""
    out = []
    for other in await _alive(conn):
        if (other.type, other.id) == (target.type, target.id):
            continue
        if _refers_to(parse(other.resource, other.type), target, hsa_id, by_id):
            out.append(f"{other.type}/{other.id}")
    return out


class Conflict(Exception):
    """The write would leave the directory inconsistent (HTTP 409)."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(text)
        self.path = path
        self.text = text


async def save(
    conn: AsyncConnection, rtype: str, rid: str, resource: dict[str, Any]
) -> StoredResource:
    """Check and store one resource (create or new version). Raises :class:`DirectoryInvalid`
    (bad content or a missing reference) or :class:`Conflict`."""
    parsed = parse(resource, rtype)
    await advisory_xact_lock(conn, DIRECTORY_LOCK)
    for ref in parsed.refs:
        if not await _resolve(conn, ref):
            raise _missing(ref)
    current = await get(conn, rtype, rid)
    if parsed.hsa_id is not None:
        twin = await search(conn, "Organization", hsa_id=parsed.hsa_id)
        if any(t.id != rid for t in twin):
            raise DirectoryInvalid(
                "Organization.identifier.value",
                f"another Organization ({twin[0].id}) has this HSA-id",
                "duplicate",
            )
    if rtype == "HealthcareService":
        others = await search(conn, rtype, organization=parsed.organization_id)
        if any(o.id != rid for o in others):
            raise DirectoryInvalid(
                "HealthcareService.providedBy",
                f"the unit already has HealthcareService/{others[0].id} (one per unit)",
                "business-rule",
            )
    if current is not None and not current.deleted and rtype == "Organization":
        old_hsa = parse(current.resource, rtype).hsa_id
        if old_hsa and old_hsa != parsed.hsa_id:
            users = await referrers(conn, current, old_hsa, by_id=False)
            if users:
                raise Conflict(
                    "Organization.identifier.value",
                    f"the old HSA-id {old_hsa} is named by {', '.join(users)}",
                )
    return await _write(conn, rtype, rid, resource, parsed, current)


async def _write(
    conn: AsyncConnection,
    rtype: str,
    rid: str,
    resource: dict[str, Any],
    parsed: Parsed,
    current: StoredResource | None,
    *,
    deleted: bool = False,
) -> StoredResource:
    now = clock.now()
    version = current.version + 1 if current else 1
    body = {
        **{k: v for k, v in resource.items() if k != "meta"},
        "id": rid,
        "meta": {"versionId": str(version), "lastUpdated": now.isoformat()},
    }
    values = {
        "version": version,
        "hsa_id": parsed.hsa_id,
        "organization_id": parsed.organization_id,
        "deleted": deleted,
        "resource": json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        "updated_at": now,
    }
    if current is None:
        await conn.execute(T.insert().values(resource_type=rtype, id=rid, **values))
    else:
        await conn.execute(
            update(T).where(T.c.resource_type == rtype, T.c.id == rid).values(**values)
        )
    return StoredResource(rtype, rid, version, deleted, body, now)


async def delete(conn: AsyncConnection, rtype: str, rid: str) -> StoredResource | None:
    """Delete (a tombstone version); None if there is nothing live to delete. Raises
    :class:`Conflict` while other resources refer to it (on-call, MAS, deviations, a
    service's endpoints, a unit's service)."""
    await advisory_xact_lock(conn, DIRECTORY_LOCK)
    current = await get(conn, rtype, rid)
    if current is None or current.deleted:
        return None
    parsed = parse(current.resource, rtype)
    users = await referrers(conn, current, parsed.hsa_id)
    if users:
        raise Conflict(rtype, f"still referred to by {', '.join(users)}; change those first")
    return await _write(conn, rtype, rid, current.resource, parsed, current, deleted=True)


# --------------------------------------------------------------------------- seeding


def _bundle_resources(path: Path) -> list[dict[str, Any]]:
    """The Organization/HealthcareService/Endpoint entries of a FHIR Bundle file, each checked,
    with every reference resolved inside the Bundle."""
    bundle = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise DirectoryError(f"{path.name}: not a FHIR Bundle")
    resources = [e.get("resource") or {} for e in bundle.get("entry") or []]
    parsed: list[Parsed] = []
    for i, r in enumerate(resources):
        rtype = r.get("resourceType")
        where = f"{path.name}: entry[{i}]"
        if rtype not in TYPES:
            raise DirectoryError(f"{where}: {rtype} is not one of {list(TYPES)}")
        if not r.get("id"):
            raise DirectoryError(f"{where}: {rtype} needs an id (references use it)")
        try:
            parsed.append(parse(r, rtype))
        except DirectoryInvalid as exc:
            raise DirectoryError(f"{where}: {exc}") from None
    ids = {(r["resourceType"], r["id"]) for r in resources}
    hsa = [p.hsa_id for p in parsed if p.hsa_id]
    if len(hsa) != len(set(hsa)):
        raise DirectoryError(f"{path.name}: two Organizations share an HSA-id")
    for i, p in enumerate(parsed):
        for ref in p.refs:
            if (ref.hsa_id and ref.hsa_id not in hsa) or (ref.id and (ref.type, ref.id) not in ids):
                raise DirectoryError(f"{path.name}: entry[{i}]: {_missing(ref)}")
    return resources


def read_file(path: Path) -> list[dict[str, Any]]:
    """The resources a directory file describes: a FHIR Bundle (``.json``) or TOML."""
    if path.suffix.lower() == ".json":
        return _bundle_resources(path)
    return to_resources(Directory.load(path))


async def seed_from_file(conn: AsyncConnection, path: Path) -> int:
    """Fill the directory from ``path`` if it has never held anything; the number of
    resources stored (0: it already had its own)."""
    await advisory_xact_lock(conn, DIRECTORY_LOCK)
    if (await conn.execute(select(func.count()).select_from(T))).scalar_one():
        return 0
    resources = read_file(path)
    for r in resources:
        await _write(conn, r["resourceType"], r["id"], r, parse(r, r["resourceType"]), None)
    log.info("directory.seeded", file=path.name, resources=len(resources))
    return len(resources)


# --------------------------------------------------------------------------- care relations


def _pairs(parties: Iterable[Any]) -> list[tuple[str, str]]:
    """(kind, HSA-id) from tuples or from anything with ``role`` and ``hsa_id`` (CareParty)."""
    out = []
    for p in parties:
        kind, hsa = p if isinstance(p, tuple) else (p.role, p.hsa_id)
        if kind and hsa and (kind, hsa) not in out:
            out.append((str(kind), str(hsa)))
    return out


async def remember(
    conn: AsyncConnection,
    patient_key: str,
    parties: Iterable[tuple[str, str]] | Iterable[Any],
    message_id: str | None,
) -> None:
    """Record that these units serve the patient. Per kind of party: a unit already
    remembered stays as it is (idempotent on replay); a new unit of that kind ends the
    relations with the others of that kind. Kinds the message does not name are untouched."""
    now = clock.now()
    by_kind: dict[str, list[str]] = {}
    for kind, hsa in _pairs(parties):
        by_kind.setdefault(kind, []).append(hsa)
    for kind, units in by_kind.items():
        open_rows = (
            await conn.execute(
                select(care_relations.c.id, care_relations.c.hsa_id).where(
                    care_relations.c.patient_key == patient_key,
                    care_relations.c.kind == kind,
                    care_relations.c.ended_at.is_(None),
                )
            )
        ).all()
        known = {r.hsa_id for r in open_rows}
        if known == set(units):
            continue
        ended = [r.id for r in open_rows if r.hsa_id not in units]
        if ended:
            await conn.execute(
                update(care_relations).where(care_relations.c.id.in_(ended)).values(ended_at=now)
            )
        for hsa in units:
            if hsa not in known:
                await conn.execute(
                    care_relations.insert().values(
                        patient_key=patient_key,
                        kind=kind,
                        hsa_id=hsa,
                        message_id=message_id,
                        recorded_at=now,
                    )
                )


async def providers(conn: AsyncConnection, patient_key: str) -> list[tuple[str, str]]:
    """(kind, HSA-id) of every unit serving the patient now, by kind then age."""
    rows = (
        await conn.execute(
            select(care_relations.c.kind, care_relations.c.hsa_id)
            .where(
                and_(
                    care_relations.c.patient_key == patient_key,
                    care_relations.c.ended_at.is_(None),
                )
            )
            .order_by(care_relations.c.kind, care_relations.c.id)
        )
    ).all()
    return [(r.kind, r.hsa_id) for r in rows]


async def merge(conn: AsyncConnection, prior_keys: Sequence[str], patient_key: str) -> None:
    """A patient merge (A40): the prior identities' relations become the patient's."""
    if prior_keys:
        await conn.execute(
            update(care_relations)
            .where(care_relations.c.patient_key.in_(list(prior_keys)))
            .values(patient_key=patient_key)
        )
