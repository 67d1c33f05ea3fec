"""The shape of a FHIR resource (data types, cardinalities) against the R4B model.

The checks that give a resource its meaning come after this one and may then trust that
every element has the type FHIR gives it: a number where an object belongs is an
OperationOutcome naming the element, never an exception in the code that reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

WRONG_TYPE = "an element of this resource has the wrong data type"


def fhirpath(rtype: str, loc: Iterable[Any]) -> str:
    """``("identifier", 0, "value")`` of an Organization -> ``Organization.identifier[0].value``."""
    path = rtype
    for part in loc:
        if part in ("root", "__root__"):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def preload(*rtypes: str) -> None:
    """Import the models now: the first import takes about a second, too long for a request
    that releases held notices."""
    from fhir.resources.R4B import get_fhir_model_class

    for rtype in rtypes:
        get_fhir_model_class(rtype)


def shape_error(
    resource: dict[str, Any], rtype: str, *, required: bool = True
) -> tuple[str, str] | None:
    """The FHIRPath and text of the first shape error, or None. ``required=False``: a missing
    element is not an error (the caller has its own rules for what must be there)."""
    from fhir.resources.R4B import get_fhir_model_class

    model = get_fhir_model_class(rtype)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if required or e.get("type") != "missing"]
        if errors:
            return fhirpath(rtype, errors[0].get("loc", ())), str(errors[0].get("msg", "invalid"))
    except (TypeError, ValueError, AttributeError):
        # Some of the library's validators fail on a wrong type instead of reporting it:
        # find the top-level element that does it.
        return _failing_element(model, resource, rtype), WRONG_TYPE
    return None


def _failing_element(model: Any, resource: dict[str, Any], rtype: str) -> str:
    for name, value in resource.items():
        try:
            model.model_validate({"resourceType": rtype, name: value})
        except ValidationError:
            continue
        except (TypeError, ValueError, AttributeError):
            return f"{rtype}.{name}"
    return rtype
