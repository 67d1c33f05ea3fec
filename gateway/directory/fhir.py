"""The directory as FHIR R4 resources: Organization, HealthcareService, Endpoint.

One unit of the directory (an :class:`~gateway.directory.Organisation`) is three kinds of
resource (docs/decisions/0009-directory-as-fhir.md):

- an **Organization**: ``identifier`` the HSA-id (``urn:oid:1.2.752.29.4.19``), ``name``,
  ``type`` the kind (a code of :data:`KIND_SYSTEM`), ``address[0].district`` the city district
  and the municipality code in the extension :data:`MUNICIPALITY_EXT` on that address;
- one **HealthcareService** ``providedBy`` it: ``availableTime`` the staffed hours (none: around
  the clock; the extension :data:`HOLIDAYS_EXT` on an ``availableTime`` keeps it open on public
  holidays), the extension :data:`ON_CALL_EXT` naming the on-call unit by HSA-id, and
  ``endpoint`` the unit's Endpoints **in order of preference**;
- one **Endpoint** per channel, ``managingOrganization`` the unit, ``connectionType``
  ``hl7-fhir-msg`` / ``hl7v2-mllp`` (HL7's code system) or ``vodok`` / ``inbox`` / ``fax`` /
  ``letter`` (:data:`CONNECTION_SYSTEM`), ``address`` a URL (see :func:`endpoint_address`).

A municipality is an Organization of type ``municipality`` identified by its municipality code
(:data:`MUNICIPALITY_SYSTEM`), with the extensions :data:`MAS_EXT` and :data:`DEVIATIONS_EXT`
naming units by HSA-id.

:func:`parse` checks one resource (structure with the ``fhir.resources`` R4B models, then the
directory's rules) and says which other resources it refers to; whoever stores it checks those
exist. Errors are :class:`DirectoryInvalid` with the FHIRPath of the element at fault.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import time
from typing import Any
from urllib.parse import quote, unquote

from gateway.directory import (
    CHANNELS,
    KINDS,
    Directory,
    Endpoint,
    Hours,
    Municipality,
    Organisation,
)
from gateway.model.fhir_shape import shape_error
from gateway.model.identifiers import HSA_SYSTEM, is_hsa_id

BASE = "https://brygga.dev/fhir"
KIND_SYSTEM = f"{BASE}/CodeSystem/organisation-kind"
CONNECTION_SYSTEM = f"{BASE}/CodeSystem/endpoint-connection-type"
HL7_CONNECTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PAYLOAD_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
MUNICIPALITY_SYSTEM = f"{BASE}/NamingSystem/kommunkod"
MUNICIPALITY_EXT = f"{BASE}/StructureDefinition/municipality"
ON_CALL_EXT = f"{BASE}/StructureDefinition/on-call"
HOLIDAYS_EXT = f"{BASE}/StructureDefinition/open-on-public-holidays"
MAS_EXT = f"{BASE}/StructureDefinition/mas"
DEVIATIONS_EXT = f"{BASE}/StructureDefinition/deviations"
MUNICIPALITY_KIND = "municipality"
TYPES = ("Organization", "HealthcareService", "Endpoint")

# channel -> (connectionType system, code)
CONNECTION: dict[str, tuple[str, str]] = {
    "fhir": (HL7_CONNECTION_SYSTEM, "hl7-fhir-msg"),
    "hl7v2": (HL7_CONNECTION_SYSTEM, "hl7v2-mllp"),
    **{c: (CONNECTION_SYSTEM, c) for c in CHANNELS if c not in ("fhir", "hl7v2")},
}
CHANNEL_BY_CODE = {code: channel for channel, code in CONNECTION.items()}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
_NAMESPACE = uuid.UUID("0d6f5f0e-6f6c-4b8e-9a35-8b1f6f2d0a09")


class DirectoryInvalid(ValueError):
    """A directory resource the gateway cannot use; ``path`` is the FHIRPath of the problem."""

    def __init__(self, path: str, text: str, code: str = "invalid") -> None:
        super().__init__(f"{path}: {text}")
        self.path = path
        self.text = text
        self.code = code


@dataclass(frozen=True, slots=True)
class Ref:
    """Another resource this one needs: by id (``Organization/abc``) or by HSA-id."""

    path: str
    type: str
    id: str = ""
    hsa_id: str = ""


@dataclass(slots=True)
class Parsed:
    """One checked resource: what the store indexes it by, and what it refers to."""

    type: str
    hsa_id: str | None
    organization_id: str | None
    refs: list[Ref] = field(default_factory=list)


def resource_id(prefix: str, key: str) -> str:
    """A readable, stable id for a resource made from the model (a uuid5 when too long)."""
    rid = f"{prefix}{key}"
    return rid if FHIR_ID.match(rid) else str(uuid.uuid5(_NAMESPACE, rid))


# --------------------------------------------------------------------------- model -> FHIR


def endpoint_address(endpoint: Endpoint) -> str:
    """The model's address as an ``Endpoint.address`` URL: fhir as it is, hl7v2 ``mllp://``
    host:port, fax ``tel:``; anything else as it is if it is a URL, otherwise
    ``urn:brygga:<channel>:<percent-encoded address>`` (``urn:brygga:<channel>`` for none)."""
    a, ch = endpoint.address, endpoint.channel
    if not a:
        return f"urn:brygga:{ch}"
    if ch == "hl7v2":
        return f"mllp://{a}"
    if ch == "fax":
        return f"tel:{a}"
    if ch == "fhir" or (re.match(r"^[a-z][a-z0-9+.\-]*:\S+$", a) and not a.startswith("urn:")):
        return a
    return f"urn:brygga:{ch}:{quote(a, safe='')}"


def model_address(channel: str, url: str) -> str:
    """The inverse of :func:`endpoint_address`."""
    prefix = f"urn:brygga:{channel}"
    if url == prefix:
        return ""
    if url.startswith(prefix + ":"):
        return unquote(url[len(prefix) + 1 :])
    if channel == "hl7v2" and url.startswith("mllp://"):
        return url[len("mllp://") :]
    if channel == "fax" and url.startswith("tel:"):
        return url[len("tel:") :]
    return url


def _hsa_ref(hsa_id: str) -> dict[str, Any]:
    return {"type": "Organization", "identifier": {"system": HSA_SYSTEM, "value": hsa_id}}


def _time(t: time) -> str:
    return t.isoformat(timespec="seconds")


def organization(org: Organisation, rid: str | None = None) -> dict[str, Any]:
    address: dict[str, Any] = {}
    if org.municipality:
        address["extension"] = [{"url": MUNICIPALITY_EXT, "valueString": org.municipality}]
    if org.district:
        address["district"] = org.district
    return {
        "resourceType": "Organization",
        "id": rid or resource_id("", org.hsa_id),
        "active": True,
        "identifier": [{"system": HSA_SYSTEM, "value": org.hsa_id}],
        "type": [{"coding": [{"system": KIND_SYSTEM, "code": org.kind}]}],
        "name": org.name,
        "address": [address] if org.municipality or org.district else [],
    }


def endpoint(ep: Endpoint, rid: str, org_id: str, name: str) -> dict[str, Any]:
    system, code = CONNECTION[ep.channel]
    return {
        "resourceType": "Endpoint",
        "id": rid,
        "status": "active",
        "connectionType": {"system": system, "code": code},
        "name": name,
        "managingOrganization": {"reference": f"Organization/{org_id}"},
        "payloadType": [{"coding": [{"system": PAYLOAD_SYSTEM, "code": "any"}]}],
        "address": endpoint_address(ep),
    }


def healthcare_service(
    org: Organisation, rid: str, org_id: str, endpoint_ids: list[str]
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "HealthcareService",
        "id": rid,
        "active": True,
        "providedBy": {"reference": f"Organization/{org_id}"},
        "name": org.name,
        "endpoint": [{"reference": f"Endpoint/{e}"} for e in endpoint_ids],
    }
    if org.hours:
        resource["availableTime"] = [
            {
                **(
                    {"extension": [{"url": HOLIDAYS_EXT, "valueBoolean": True}]}
                    if h.holidays
                    else {}
                ),
                "daysOfWeek": [DAYS[d] for d in sorted(h.days)],
                "availableStartTime": _time(h.opens),
                "availableEndTime": _time(h.closes),
            }
            for h in org.hours
        ]
    if org.on_call:
        resource["extension"] = [{"url": ON_CALL_EXT, "valueReference": _hsa_ref(org.on_call)}]
    return resource


def municipality(town: Municipality) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Organization",
        "id": resource_id("kommun-", town.code),
        "active": True,
        "identifier": [{"system": MUNICIPALITY_SYSTEM, "value": town.code}],
        "type": [{"coding": [{"system": KIND_SYSTEM, "code": MUNICIPALITY_KIND}]}],
        "name": town.name,
    }
    extensions = [
        {"url": url, "valueReference": _hsa_ref(ref)}
        for url, ref in ((MAS_EXT, town.mas), (DEVIATIONS_EXT, town.deviations))
        if ref
    ]
    if extensions:
        resource["extension"] = extensions
    return resource


def unit_resources(org: Organisation, org_id: str | None = None) -> list[dict[str, Any]]:
    """One unit as its Organization, HealthcareService and Endpoints (ids from the HSA-id)."""
    org_id = org_id or resource_id("", org.hsa_id)
    endpoint_ids = [resource_id("ep-", f"{org.hsa_id}-{i}") for i in range(len(org.endpoints))]
    return [
        organization(org, org_id),
        healthcare_service(org, resource_id("hs-", org.hsa_id), org_id, endpoint_ids),
        *(
            endpoint(ep, rid, org_id, f"{org.name}: {ep.channel}")
            for ep, rid in zip(org.endpoints, endpoint_ids, strict=True)
        ),
    ]


def to_resources(directory: Directory) -> list[dict[str, Any]]:
    """The whole directory as FHIR resources: units, then municipalities."""
    out = [r for org in directory for r in unit_resources(org)]
    return out + [municipality(t) for t in directory.municipalities]


def to_bundle(directory: Directory) -> dict[str, Any]:
    """A FHIR ``collection`` Bundle of the directory (what ``seed_from_file`` reads back)."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r}
            for r in to_resources(directory)
        ],
    }


# --------------------------------------------------------------------------- FHIR -> model


def _coding(concept: Any, system: str) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if coding.get("system") == system:
            return str(coding.get("code") or "")
    return None


def _kind(resource: dict[str, Any]) -> str | None:
    for concept in resource.get("type") or []:
        code = _coding(concept, KIND_SYSTEM)
        if code is not None:
            return code
    return None


def _identifier(resource: dict[str, Any], system: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if ident.get("system") == system:
            return str(ident.get("value") or "")
    return None


def _extension(element: dict[str, Any], url: str) -> dict[str, Any] | None:
    return next((e for e in element.get("extension") or [] if e.get("url") == url), None)


def _ext_hsa(element: dict[str, Any], url: str) -> str:
    ext = _extension(element, url)
    if ext is None:
        return ""
    return str(((ext.get("valueReference") or {}).get("identifier") or {}).get("value") or "")


def _local_id(reference: Any, rtype: str) -> str:
    """``Organization/abc`` (or a full URL ending so, or ``…/_history/n``) -> ``abc``."""
    ref = str((reference or {}).get("reference") or "")
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == rtype:
        return parts[-1]
    return ""


def _parse_time(value: Any) -> time:
    return time.fromisoformat(str(value))


def hours_of(service: dict[str, Any]) -> tuple[Hours, ...]:
    out = []
    for slot in service.get("availableTime") or []:
        days = frozenset(DAYS.index(d) for d in slot.get("daysOfWeek") or DAYS)
        if slot.get("allDay"):
            opens, closes = time(0), time.max
        else:
            opens = _parse_time(slot.get("availableStartTime", "00:00:00"))
            closes = _parse_time(slot.get("availableEndTime", "23:59:59"))
        holidays = bool((_extension(slot, HOLIDAYS_EXT) or {}).get("valueBoolean", False))
        out.append(Hours(days, opens, closes, holidays))
    return tuple(out)


def from_resources(resources: Iterable[dict[str, Any]]) -> Directory:
    """The directory the resources describe. Inactive Organizations and Endpoints that are not
    ``active`` are left out; references are not checked here (:func:`parse` does that on the
    way in; ``Directory.check`` can be called on the result)."""
    orgs: dict[str, dict[str, Any]] = {}
    services: dict[str, dict[str, Any]] = {}
    endpoints: dict[str, dict[str, Any]] = {}
    towns: list[Municipality] = []
    for r in resources:
        rtype = r.get("resourceType")
        if rtype == "Organization" and r.get("active", True):
            if _kind(r) == MUNICIPALITY_KIND:
                towns.append(
                    Municipality(
                        _identifier(r, MUNICIPALITY_SYSTEM) or "",
                        str(r.get("name") or ""),
                        _ext_hsa(r, MAS_EXT),
                        _ext_hsa(r, DEVIATIONS_EXT),
                    )
                )
            else:
                orgs[str(r["id"])] = r
        elif rtype == "HealthcareService" and r.get("active", True):
            services.setdefault(_local_id(r.get("providedBy"), "Organization"), r)
        elif rtype == "Endpoint":
            endpoints[str(r["id"])] = r
    units = []
    for org_id, r in orgs.items():
        address = (r.get("address") or [{}])[0]
        fields: dict[str, Any] = {}
        service = services.get(org_id)
        if service is not None:
            chosen = []
            for ref in service.get("endpoint") or []:
                ep = endpoints.get(_local_id(ref, "Endpoint"))
                if ep is None or ep.get("status") != "active":
                    continue
                channel = CHANNEL_BY_CODE[_connection(ep)]
                chosen.append(Endpoint(channel, model_address(channel, str(ep["address"]))))
            fields = {
                "endpoints": tuple(chosen),
                "hours": hours_of(service),
                "on_call": _ext_hsa(service, ON_CALL_EXT),
            }
        units.append(
            Organisation(
                hsa_id=_identifier(r, HSA_SYSTEM) or "",
                name=str(r.get("name") or ""),
                kind=_kind(r) or "",
                municipality=str(
                    (_extension(address, MUNICIPALITY_EXT) or {}).get("valueString") or ""
                ),
                district=str(address.get("district") or ""),
                **fields,
            )
        )
    return Directory(units, towns)


def _connection(resource: dict[str, Any]) -> tuple[str, str]:
    ct = resource.get("connectionType") or {}
    return (str(ct.get("system") or ""), str(ct.get("code") or ""))


# --------------------------------------------------------------------------- checking input


def _structure(resource: dict[str, Any], rtype: str) -> None:
    """Validate against the R4B model of the type (cardinalities, data types)."""
    failed = shape_error(resource, rtype)
    if failed is not None:
        raise DirectoryInvalid(*failed)


def _ext_path(rtype: str, url: str) -> str:
    return f"{rtype}.extension.where(url='{url}').valueReference.identifier.value"


def _hsa_refs(resource: dict[str, Any], rtype: str, urls: Iterable[str]) -> list[Ref]:
    refs = []
    for url in urls:
        ext = _extension(resource, url)
        if ext is None:
            continue
        value = _ext_hsa(resource, url)
        path = _ext_path(rtype, url)
        if not is_hsa_id(value):
            raise DirectoryInvalid(path, "must name a unit by HSA-id (identifier)")
        refs.append(Ref(path, "Organization", hsa_id=value))
    return refs


def _check_organization(r: dict[str, Any]) -> Parsed:
    if not str(r.get("name") or "").strip():
        raise DirectoryInvalid("Organization.name", "a unit needs a name")
    kind = _kind(r)
    if kind is None:
        raise DirectoryInvalid(
            "Organization.type", f"needs a coding of {KIND_SYSTEM} (the kind of unit)"
        )
    if kind == MUNICIPALITY_KIND:
        code = _identifier(r, MUNICIPALITY_SYSTEM)
        if not code or not re.fullmatch(r"[0-9]{4}", code):
            raise DirectoryInvalid(
                "Organization.identifier",
                f"a municipality is identified by its four-digit code ({MUNICIPALITY_SYSTEM})",
            )
        return Parsed(
            "Organization", None, None, _hsa_refs(r, "Organization", (MAS_EXT, DEVIATIONS_EXT))
        )
    if kind not in KINDS:
        raise DirectoryInvalid(
            "Organization.type.coding.code",
            f"unknown kind {kind!r}: one of {sorted(KINDS | {MUNICIPALITY_KIND})}",
        )
    hsa = _identifier(r, HSA_SYSTEM)
    if hsa is None:
        raise DirectoryInvalid("Organization.identifier", f"needs an HSA-id ({HSA_SYSTEM})")
    if not is_hsa_id(hsa):
        raise DirectoryInvalid(
            "Organization.identifier.value", "not an HSA-id (SE<10 digits>-<local part>)"
        )
    addresses = r.get("address") or []
    if len(addresses) > 1:
        raise DirectoryInvalid("Organization.address", "give one address (the unit's)")
    if addresses:
        ext = _extension(addresses[0], MUNICIPALITY_EXT)
        if ext is not None and not re.fullmatch(r"[0-9]{4}", str(ext.get("valueString") or "")):
            raise DirectoryInvalid(
                f"Organization.address[0].extension.where(url='{MUNICIPALITY_EXT}').valueString",
                "the municipality code has four digits (0180 Stockholm)",
            )
    return Parsed("Organization", hsa, None)


def _check_service(r: dict[str, Any]) -> Parsed:
    org_id = _local_id(r.get("providedBy"), "Organization")
    if not org_id:
        raise DirectoryInvalid(
            "HealthcareService.providedBy", "must reference the unit (Organization/<id>)"
        )
    refs = [Ref("HealthcareService.providedBy", "Organization", id=org_id)]
    seen = set()
    for i, ref in enumerate(r.get("endpoint") or []):
        ep_id = _local_id(ref, "Endpoint")
        path = f"HealthcareService.endpoint[{i}]"
        if not ep_id:
            raise DirectoryInvalid(path, "must reference an Endpoint (Endpoint/<id>)")
        if ep_id in seen:
            raise DirectoryInvalid(path, "the same Endpoint is listed twice")
        seen.add(ep_id)
        refs.append(Ref(path, "Endpoint", id=ep_id))
    for i, slot in enumerate(r.get("availableTime") or []):
        path = f"HealthcareService.availableTime[{i}]"
        if slot.get("allDay"):
            continue
        if "availableStartTime" not in slot or "availableEndTime" not in slot:
            raise DirectoryInvalid(
                path, "give availableStartTime and availableEndTime, or allDay true"
            )
        if _parse_time(slot["availableEndTime"]) <= _parse_time(slot["availableStartTime"]):
            raise DirectoryInvalid(
                path + ".availableEndTime",
                "closes before it opens (hours past midnight are two entries)",
            )
    refs += _hsa_refs(r, "HealthcareService", (ON_CALL_EXT,))
    return Parsed("HealthcareService", None, org_id, refs)


def _check_endpoint(r: dict[str, Any]) -> Parsed:
    conn = _connection(r)
    channel = CHANNEL_BY_CODE.get(conn)
    if channel is None:
        known = ", ".join(f"{s}|{c}" for s, c in CONNECTION.values())
        raise DirectoryInvalid("Endpoint.connectionType", f"unknown; one of {known}")
    address = str(r.get("address") or "")
    if channel == "fhir" and not re.match(r"^https?://\S+$", address):
        raise DirectoryInvalid("Endpoint.address", "a FHIR endpoint needs its http(s) URL")
    if channel == "hl7v2" and not _HOST_PORT.match(model_address("hl7v2", address)):
        raise DirectoryInvalid("Endpoint.address", "an HL7 v2 endpoint needs mllp://host:port")
    org_id = _local_id(r.get("managingOrganization"), "Organization")
    refs = [Ref("Endpoint.managingOrganization", "Organization", id=org_id)] if org_id else []
    return Parsed("Endpoint", None, org_id or None, refs)


_CHECKS = {
    "Organization": _check_organization,
    "HealthcareService": _check_service,
    "Endpoint": _check_endpoint,
}


def parse(resource: Any, rtype: str) -> Parsed:
    """Check one resource of type ``rtype`` as the directory needs it; raises
    :class:`DirectoryInvalid` naming the element. The references it returns are for the
    caller to resolve (the store, or the other entries of a Bundle)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
        raise DirectoryInvalid(rtype, f"the body must be a FHIR {rtype} resource (JSON)")
    if "id" in resource and not FHIR_ID.match(str(resource["id"])):
        raise DirectoryInvalid(f"{rtype}.id", "a FHIR id: 1-64 of A-Z a-z 0-9 - .")
    _structure(resource, rtype)
    return _CHECKS[rtype](resource)
