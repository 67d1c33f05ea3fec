"""Who can receive messages, and how: organisations, their channels, hours and fallbacks.

The model here is plain data: an :class:`Organisation` (a unit with an HSA-id) has endpoints
in order of preference, opening hours and an on-call unit that takes over outside them; a
:class:`Municipality` names who answers for it when something goes wrong (the MAS) and where
its deviations go. Where the data comes from (a TOML file, FHIR resources) is the loaders'
business.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, time
from pathlib import Path
from typing import Any, Protocol

from gateway.clock import STOCKHOLM
from gateway.model.identifiers import is_hsa_id

KINDS = frozenset(
    {
        "hospital",
        "primary-care",
        "needs-assessment",
        "home-care",
        "home-care-night",
        "sabo",
        "short-term-care",
        "rehab",
        "municipal-health-care",
        "psychiatry",
        "asih",
        "on-call",
    }
)
# Every channel a recipient may name, whether or not this installation has its worker.
CHANNELS = ("fhir", "hl7v2", "vodok", "inbox", "fax", "letter")
NEEDS_ADDRESS = frozenset({"fhir", "hl7v2"})  # channels that cannot work without one
_DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one channel reaches a unit: a URL (fhir), host:port (hl7v2), a fax number, …"""

    channel: str
    address: str = ""


@dataclass(frozen=True, slots=True)
class Hours:
    """Staffed hours on some days of the week (Europe/Stockholm). Public holidays are closed
    unless ``holidays`` says the unit is open then too."""

    days: frozenset[int]  # 0 = Monday
    opens: time
    closes: time
    holidays: bool = False

    def covers(self, local: datetime, holiday: bool) -> bool:
        if holiday and not self.holidays:
            return False
        return local.weekday() in self.days and self.opens <= local.time() < self.closes


@dataclass(frozen=True, slots=True)
class Organisation:
    hsa_id: str
    name: str
    kind: str
    municipality: str
    endpoints: tuple[Endpoint, ...] = (Endpoint("inbox"),)
    district: str = ""
    hours: tuple[Hours, ...] = ()  # none: staffed around the clock
    on_call: str = ""  # HSA-id of the unit that takes over outside the hours

    @property
    def channels(self) -> tuple[str, ...]:
        """The channel names in the unit's order of preference."""
        return tuple(e.channel for e in self.endpoints)

    def endpoint(self, channel: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.channel == channel), None)

    def staffed_at(self, when: datetime) -> bool:
        """Is someone at the unit at ``when``? (Swedish public holidays count as closed.)"""
        if not self.hours:
            return True
        from gateway.pipeline.deadlines import is_weekday  # the one calendar

        local = when.astimezone(STOCKHOLM)
        holiday = local.weekday() < 5 and not is_weekday(local.date())
        return any(h.covers(local, holiday) for h in self.hours)


@dataclass(frozen=True, slots=True)
class Municipality:
    """A municipality (or a city district, by its code): who answers for it."""

    code: str
    name: str
    mas: str = ""  # HSA-id of the medically responsible nurse's unit: the last escalation step
    deviations: str = ""  # HSA-id whose deviation inbox receives its deviations


class DirectorySource(Protocol):
    """Where the stages get the directory as it is now: per message, so a unit added or an
    endpoint changed over the API counts from the next message on."""

    async def current(self, conn: Any) -> Directory: ...


class DirectoryError(ValueError):
    """The directory file is wrong; the message says where."""


@dataclass
class Directory:
    organisations: list[Organisation]
    municipalities: list[Municipality] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_hsa = {o.hsa_id: o for o in self.organisations}
        self._by_code = {m.code: m for m in self.municipalities}

    def get(self, hsa_id: str) -> Organisation | None:
        return self._by_hsa.get(hsa_id)

    async def current(self, conn: Any) -> Directory:
        """A directory held in memory is its own current version (tests, a fixed file)."""
        return self

    def municipality(self, code: str) -> Municipality | None:
        return self._by_code.get(code)

    def serving(self, kind: str, municipality: str, district: str = "") -> Organisation | None:
        """The unit of ``kind`` that serves the residents of a municipality (and district):
        the district's own unit, else one for the whole municipality (no district). Of
        several, the first by HSA-id, so the choice does not depend on the load order."""
        units = sorted(
            (o for o in self if o.kind == kind and o.municipality == municipality),
            key=lambda o: o.hsa_id,
        )
        own = [o for o in units if district and o.district == district]
        whole = [o for o in units if not o.district]
        return (own or whole or [None])[0]

    def __iter__(self) -> Iterator[Organisation]:
        return iter(self._by_hsa.values())

    def __len__(self) -> int:
        return len(self._by_hsa)

    @classmethod
    def load(cls, path: Path) -> Directory:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        orgs = [
            _organisation(entry, f"{path.name}: organisation #{i}")
            for i, entry in enumerate(data.get("organisation", []), start=1)
        ]
        towns = []
        for i, entry in enumerate(data.get("municipality", []), start=1):
            where = f"{path.name}: municipality #{i}"
            try:
                towns.append(
                    Municipality(
                        str(entry["code"]),
                        entry["name"],
                        entry.get("mas", ""),
                        entry.get("deviations", ""),
                    )
                )
            except KeyError as missing:
                raise DirectoryError(f"{where}: missing key {missing}") from None
        directory = cls(orgs, towns)
        directory.check()
        return directory

    def check(self) -> None:
        """Every HSA-id an entry points to (on-call, MAS, deviations) is in the directory."""
        for org in self:
            if org.on_call and org.on_call not in self._by_hsa:
                raise DirectoryError(f"{org.hsa_id}: on_call {org.on_call} is not in the directory")
        for town in self.municipalities:
            for role in ("mas", "deviations"):
                ref = getattr(town, role)
                if ref and ref not in self._by_hsa:
                    raise DirectoryError(
                        f"municipality {town.code}: {role} {ref} is not in the directory"
                    )


def _organisation(entry: dict[str, Any], where: str) -> Organisation:
    try:
        endpoints = tuple(
            Endpoint(e["channel"], str(e.get("address", "")))
            for e in entry.get(
                "endpoint", [{"channel": c} for c in entry.get("channels", ["inbox"])]
            )
        )
        org = Organisation(
            hsa_id=entry["hsa_id"],
            name=entry["name"],
            kind=entry["kind"],
            municipality=str(entry.get("municipality", "")),
            district=str(entry.get("district", "")),
            endpoints=endpoints,
            hours=tuple(_hours(h, where) for h in entry.get("hours", [])),
            on_call=entry.get("on_call", ""),
        )
    except KeyError as missing:
        raise DirectoryError(f"{where}: missing key {missing}") from None
    if not is_hsa_id(org.hsa_id):
        raise DirectoryError(f"{where}: hsa_id is not an HSA-id (SE<10 digits>-<local>)")
    if org.kind not in KINDS:
        raise DirectoryError(f"{where}: kind must be one of {sorted(KINDS)}")
    for e in org.endpoints:
        if e.channel not in CHANNELS:
            raise DirectoryError(f"{where}: channel {e.channel!r} must be one of {list(CHANNELS)}")
        if e.channel in NEEDS_ADDRESS and not e.address:
            raise DirectoryError(f"{where}: a {e.channel} endpoint needs an address")
    return org


def _hours(entry: dict[str, Any], where: str) -> Hours:
    """``{days = "mon-fri", opens = "07:00", closes = "22:00", holidays = false}``."""
    try:
        first, _, last = entry["days"].partition("-")
        lo, hi = _DAYS[first], _DAYS[last or first]
        hours = Hours(
            frozenset(range(lo, hi + 1)),
            time.fromisoformat(entry["opens"]),
            time.fromisoformat(entry["closes"]),
            bool(entry.get("holidays", False)),
        )
    except (KeyError, ValueError) as exc:
        raise DirectoryError(
            f"{where}: hours need days like 'mon-fri' and opens/closes like '07:00' ({exc})"
        ) from None
    if not lo <= hi:
        raise DirectoryError(f"{where}: hours days {entry['days']!r} run backwards")
    if hours.closes <= hours.opens:
        raise DirectoryError(
            f"{where}: hours close ({entry['closes']}) before they open ({entry['opens']}); "
            "hours past midnight are two entries"
        )
    return hours
