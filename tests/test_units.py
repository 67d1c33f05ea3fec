"""Settings, directory, routing rules, keys, log redaction and the canonical model."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import logs
from gateway.bus.keys import PatientKeyer
from gateway.directory import Directory, DirectoryError
from gateway.model.bundle import (
    CanonicalMessage,
    CareParty,
    ConsentBasis,
    read_bundle,
    to_bundle,
    validate_bundle,
)
from gateway.model.events import LusEvent, code_system
from gateway.model.identifiers import parse_identity_number
from gateway.pipeline.routing import RoutingRules
from gateway.settings import Settings
from tests.support import personnummer


def test_settings_from_toml_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("BRYGGA_"):
            monkeypatch.delenv(key)
    default = Settings(_env_file=None)
    assert default.mllp_port == 2575 and default.http_port == 8080
    assert default.db_url.startswith("sqlite+aiosqlite:///") and default.db_url.endswith(
        "var/brygga.db"
    )
    assert default.kafka_bootstrap is None
    toml = tmp_path / "brygga.toml"
    toml.write_text('http_port = 9090\nmllp_port = 3575\ndata_dir = "/srv/brygga"\n')
    monkeypatch.setenv("BRYGGA_CONFIG", str(toml))
    monkeypatch.setenv("BRYGGA_MLLP_PORT", "4575")
    import importlib

    import gateway.settings as settings_module

    reloaded = importlib.reload(settings_module)
    s = reloaded.Settings()
    assert (s.http_port, s.mllp_port) == (9090, 4575)  # environment beats the file
    assert s.db_url == "sqlite+aiosqlite:////srv/brygga/brygga.db"
    monkeypatch.delenv("BRYGGA_CONFIG")
    importlib.reload(settings_module)


def test_directory_and_rules_errors_say_where(tmp_path: Path) -> None:
    from gateway.runtime import directory_path

    demo = Directory.load(directory_path(Settings()))
    kinds = sorted(o.kind for o in demo)
    assert {"home-care", "home-care-night", "sabo", "rehab", "on-call"} <= set(kinds)
    bad = tmp_path / "dir.toml"
    bad.write_text('[[organisation]]\nhsa_id = "SE1-x"\nname = "A"\nkind = "home-care"\n')
    with pytest.raises(DirectoryError, match="dir.toml: organisation #1: hsa_id"):
        Directory.load(bad)
    bad.write_text('[[organisation]]\nhsa_id = "SE5566778899-A1"\nname = "A"\nkind = "spa"\n')
    with pytest.raises(DirectoryError, match="kind must be one of"):
        Directory.load(bad)
    rules = tmp_path / "rules.toml"
    rules.write_text('[inskrivning]\nreceivers = ["bistand"]\n')
    with pytest.raises(ValueError, match=r"\[inskrivning\] is not a LUS event"):
        RoutingRules.load(rules)


@given(st.integers(min_value=0, max_value=100_000))
def test_patient_keys_are_stable_secret_and_opaque(n: int) -> None:
    pnr = personnummer(n)
    a, b = PatientKeyer(b"a" * 32), PatientKeyer(b"b" * 32)
    system = "http://electronichealth.se/identifier/personnummer"
    assert a.key(system, pnr) == a.key(system, pnr)
    assert a.key(system, pnr) != b.key(system, pnr)
    assert pnr[2:] not in a.key(system, pnr)


def test_logs_mask_identity_numbers_and_exception_text(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")
    log = structlog.get_logger("test")
    try:
        raise ValueError("patient 191212121212 Tolvan")
    except ValueError:
        log.error("boom", note="id 19121212-1212 and 121212-1212", exc_info=True)
    logging.getLogger("foreign").warning("from stdlib 191212121212")
    err = capsys.readouterr().err
    assert "1212121212" not in err and "Tolvan" not in err and "1212-1212" not in err
    first = json.loads(err.splitlines()[0])
    assert first["error"] == "ValueError" and first["at"].startswith("test_units.py:")
    assert err.count("<redacted>") >= 3


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("missing local-ef427216465626f6", True),  # a hex key id with 12 digits in a row
        ("unit SE2321000016-A1B2", True),  # an HSA-id: organisation number inside a token
        ("pnr 191212121212.", False),
        ("(19121212-1212)", False),
        ("PID|1||121212-1212^^^", False),
    ],
)
def test_redaction_takes_identity_numbers_not_digits_inside_ids(text: str, kept: bool) -> None:
    assert (logs.redact_identity_numbers(text) == text) is kept


hsa = st.from_regex(r"SE[0-9]{10}-[A-Z0-9]{2,6}", fullmatch=True)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    event=st.sampled_from(list(LusEvent)),
    n=st.integers(0, 10_000),
    family=text,
    given_name=text,
    parties=st.lists(
        st.tuples(st.sampled_from(["hemtjanst", "sabo", "rehab", "bistand"]), hsa),
        max_size=4,
        unique_by=lambda p: p[1],
    ),
    consent=st.sampled_from([None, "samtycke", "menprovning", "sparr"]),
    protected=st.booleans(),
)
def test_every_canonical_message_is_a_valid_fhir_message_that_reads_back(
    event: LusEvent,
    n: int,
    family: str,
    given_name: str,
    parties: list[tuple[str, str]],
    consent: str | None,
    protected: bool,
) -> None:
    at = datetime(2026, 11, 23, 8, tzinfo=UTC)
    msg = CanonicalMessage(
        event=event,
        occurred_at=at,
        sender_hsa_id="SE2321000016-H001",
        sender_name="S",
        patient_ids=[parse_identity_number(personnummer(n))],
        family=family.strip() or "X",
        given=given_name.strip(),
        protected_identity=protected,
        care_parties=[CareParty(r, h) for r, h in parties],
        consent=ConsentBasis(consent, at) if consent else None,
        expected_discharge=at,
    )
    bundle = to_bundle(msg, "8d5c1f3e-0000-4000-8000-000000000001")
    validate_bundle(bundle)
    assert bundle["entry"][0]["resource"]["resourceType"] == "MessageHeader"
    assert any(e["resource"]["resourceType"] == "CarePlan" for e in bundle["entry"]) == (
        event.has_careplan
    )
    view = read_bundle(json.loads(json.dumps(bundle)))
    assert view.event is event
    assert [(p.role, p.hsa_id) for p in view.parties] == parties
    assert view.consent_basis == consent
    assert view.protected_identity is protected
    assert view.patient_identifier == personnummer(n)
    assert personnummer(n) not in repr(msg) and "PatientId" in repr(msg.patient_ids[0])


def test_identifiers_accept_ascii_digits_only() -> None:
    from gateway.model.identifiers import InvalidIdentifier, is_hsa_id

    assert is_hsa_id("SE2321000016-H001")
    assert not is_hsa_id("SE232100001\u0660-H001")  # ARABIC-INDIC DIGIT ZERO
    with pytest.raises(InvalidIdentifier):
        parse_identity_number("19121212121\u0662")


def test_lus_code_system_is_valid_fhir() -> None:
    from fhir.resources.R4B.codesystem import CodeSystem

    cs = CodeSystem.model_validate(code_system())
    assert {c.code for c in cs.concept} == {e.value for e in LusEvent}


def test_cli_tools_refuse_a_directory_without_the_gateway(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "BRYGGA_DATA_DIR": str(tmp_path / "nowhere")}
    env.pop("BRYGGA_DATABASE_URL", None)
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--org", "SE5566778899-HT01", "--name", "A"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert token.returncode == 2 and "no token signing key" in token.stdout
    assert not (tmp_path / "nowhere" / "keys").exists()  # nothing created by mistake
    status = subprocess.run(
        [sys.executable, "-m", "gateway", "status", "x"], env=env, capture_output=True, text=True
    )
    assert status.returncode == 2 and "Cannot read the ledger" in status.stdout
    assert "SELECT" not in status.stdout + status.stderr
