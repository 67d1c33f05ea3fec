"""Who can receive messages, and how: organisations, their kind and their channels."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.model.identifiers import is_hsa_id

KINDS = frozenset(
    {
        "hospital",
        "primary-care",
        "needs-assessment",
        "home-care",
        "sabo",
        "rehab",
        "municipal-health-care",
        "psychiatry",
        "asih",
    }
)


@dataclass(frozen=True, slots=True)
class Organisation:
    hsa_id: str
    name: str
    kind: str
    municipality: str
    channels: tuple[str, ...]


class DirectoryError(ValueError):
    """The directory file is wrong; the message says where."""


class Directory:
    def __init__(self, organisations: list[Organisation]) -> None:
        self._by_hsa = {o.hsa_id: o for o in organisations}

    def get(self, hsa_id: str) -> Organisation | None:
        return self._by_hsa.get(hsa_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_hsa.values())

    def __len__(self) -> int:
        return len(self._by_hsa)

    @classmethod
    def load(cls, path: Path) -> Directory:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        orgs = []
        for i, entry in enumerate(data.get("organisation", []), start=1):
            where = f"{path.name}: organisation #{i}"
            try:
                org = Organisation(
                    hsa_id=entry["hsa_id"],
                    name=entry["name"],
                    kind=entry["kind"],
                    municipality=str(entry.get("municipality", "")),
                    channels=tuple(entry.get("channels", ["inbox"])),
                )
            except KeyError as missing:
                raise DirectoryError(f"{where}: missing key {missing}") from None
            if not is_hsa_id(org.hsa_id):
                raise DirectoryError(f"{where}: hsa_id is not an HSA-id (SE<10 digits>-<local>)")
            if org.kind not in KINDS:
                raise DirectoryError(f"{where}: kind must be one of {sorted(KINDS)}")
            orgs.append(org)
        return cls(orgs)
