"""Where the patient lives: the municipality (kommunkod) and, in a city with districts, the
district (stadsdelsområde) that must be told of the stay, from the folkbokföringsadress.

The municipality decides the municipal recipients, not the sender (decision 0016). In
production the population register (folkbokföringen) answers; the default is a postcode
table in ``mappings/geography/postcodes.toml`` (example data a region replaces with its
register extract). Configuration picks the implementation (``residence_lookup``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from gateway.model.bundle import Address
from mappings import MAPPINGS_DIR

POSTCODES_FILE = MAPPINGS_DIR / "geography" / "postcodes.toml"
_KOMMUNKOD = re.compile(r"\d{4}")
_PREFIX = re.compile(r"\d{1,5}")


@dataclass(frozen=True, slots=True)
class Residence:
    """The municipality by its code, and the district where the municipality has them."""

    municipality: str
    district: str = ""


class ResidenceLookup(Protocol):
    """Where a patient lives, for routing. ``patient_identifier`` is the identity number a
    population register is asked by; the table implementation reads only the address."""

    async def locate(self, patient_identifier: str, address: Address | None) -> Residence | None:
        """The residence, or None when it cannot be told (routing then fails visibly)."""
        ...


class PostcodeError(ValueError):
    """The postcode table is wrong; the message says where."""


class PostcodeTable:
    """Postcode (by its longest listed prefix) -> municipality and district.

    A municipality code the sender gave (XAD-9) wins over the postcode; the postcode then
    only adds the district, and only if it lies in that municipality.
    """

    def __init__(
        self, areas: dict[str, Residence], municipalities: dict[str, str] | None = None
    ) -> None:
        self._areas = areas
        self.municipalities = municipalities or {}  # kommunkod -> name (documentation, checks)

    def place(self, postal_code: str) -> Residence | None:
        """The area of the longest prefix of ``postal_code`` the table lists."""
        code = postal_code.replace(" ", "")
        if not code.isdigit():
            return None
        for n in range(len(code), 0, -1):
            found = self._areas.get(code[:n])
            if found is not None:
                return found
        return None

    def residence(self, address: Address | None) -> Residence | None:
        """The residence ``address`` tells, without asking anyone."""
        if address is None:
            return None
        area = self.place(address.postal_code) if address.postal_code else None
        if address.municipality:
            same = area is not None and area.municipality == address.municipality
            return Residence(address.municipality, area.district if same and area else "")
        return area

    async def locate(self, patient_identifier: str, address: Address | None) -> Residence | None:
        return self.residence(address)

    @classmethod
    def load(cls, path: Path = POSTCODES_FILE) -> PostcodeTable:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        towns = {str(k): str(v) for k, v in data.get("municipalities", {}).items()}
        areas: dict[str, Residence] = {}
        for i, entry in enumerate(data.get("area", []), start=1):
            where = f"{path.name}: area #{i}"
            try:
                prefixes = [str(p) for p in entry["postcodes"]]
                town = str(entry["municipality"])
            except KeyError as missing:
                raise PostcodeError(f"{where}: missing key {missing}") from None
            if not _KOMMUNKOD.fullmatch(town) or town not in towns:
                raise PostcodeError(f"{where}: municipality {town!r} is not in [municipalities]")
            for prefix in prefixes:
                if not _PREFIX.fullmatch(prefix):
                    raise PostcodeError(f"{where}: postcode prefix {prefix!r} is not 1-5 digits")
                if prefix in areas:
                    raise PostcodeError(f"{where}: postcode prefix {prefix} is listed twice")
                areas[prefix] = Residence(town, str(entry.get("district", "")))
        return cls(areas, towns)


def lookup_from(name: str, postcodes_file: Path | None = None) -> ResidenceLookup:
    """The configured lookup: ``table`` (the postcode table), or the name of an entry point
    in the group ``brygga.residence`` (a population-register client), called without
    arguments."""
    if name == "table":
        return PostcodeTable.load(postcodes_file or POSTCODES_FILE)
    found = {ep.name: ep for ep in entry_points(group="brygga.residence")}
    if name not in found:
        raise ValueError(
            f"no residence lookup {name!r} is installed (entry points: {sorted(found)})"
        )
    lookup: ResidenceLookup = found[name].load()()
    return lookup
