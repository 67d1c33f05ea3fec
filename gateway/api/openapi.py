"""OpenAPI documentation helpers: every endpoint shows a real-looking example answer."""

from __future__ import annotations

from typing import Any


def example(body: Any, errors: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the 200 example, plus each documented error status."""
    responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/json": {"example": body}}}
    }
    for code, description in (errors or {}).items():
        responses[code] = {"description": description}
    return responses
