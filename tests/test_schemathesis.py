"""Schemathesis over every operation of the OpenAPI description, on PostgreSQL.

Each operation gets generated requests (valid and invalid: wrong types, NUL bytes, huge
numbers, missing fields) with a valid token in the role it serves; none may answer 5xx.
PostgreSQL, because it refuses what SQLite stores (NUL in text). ``BRYGGA_SCHEMATHESIS_EXAMPLES``
sets the examples per operation (docs/reliability.md, "Schemathesis", has the larger run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from tests.apiserver import ApiServer
from tests.support import create_pg_database, drop_pg_database

EXAMPLES = int(os.environ.get("BRYGGA_SCHEMATHESIS_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    url = create_pg_database()
    server = ApiServer(url, Path(tmp_path_factory.mktemp("st")) / "keys").start()
    try:
        yield server
    finally:
        server.stop()
        drop_pg_database(url)


def _description() -> dict[str, object]:
    """The app's own OpenAPI document (no database needed to describe it). Loaded eagerly:
    schemathesis's fixture-based loader does not run on pytest 9."""
    keys = TokenKeys(Ed25519PrivateKey.generate())
    return create_app(None, keys, list).openapi()  # type: ignore[arg-type]


schema = schemathesis.openapi.from_dict(_description())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_no_operation_answers_a_server_error(case: schemathesis.Case, api_server: ApiServer) -> None:
    headers = {**(case.headers or {}), **api_server.headers(case.path)}
    case.call_and_validate(base_url=api_server.url, headers=headers, checks=[not_a_server_error])
