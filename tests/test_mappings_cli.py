"""``brygga mappings test``: golden cases pass, the coverage report accounts for every field.

An integration engineer relies on this command after editing the TOML files: it must fail
(exit 1) on a changed Bundle and on any field present but neither mapped nor ignored, and
its output must name cases and fields, never field values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.takecare.mapping import load_mapping
from adapters.takecare.mappings_cli import app, coverage, run_cases
from mappings import MAPPINGS_DIR

TAKECARE = MAPPINGS_DIR / "takecare"
CASES = len(list((TAKECARE / "golden").glob("*.hl7")))
runner = CliRunner()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of mappings/takecare to break on purpose."""
    target = tmp_path / "takecare"
    shutil.copytree(TAKECARE, target)
    return target


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["test", *args])
    return result.exit_code, result.output


def test_the_shipped_mappings_pass() -> None:
    code, out = _run()
    assert code == 0, out
    assert f"{CASES} cases: {CASES} pass, 0 fail." in out
    assert "0 UNACCOUNTED." in out
    assert "  pass  episode_06_a13_cancel_discharge  ADT^A13  makulera-utskrivning" in out
    assert "PID-11  mapped" in out  # the folkbokföringsadress (decision 0016)
    assert "TXA-2   mapped" in out


def test_json_report() -> None:
    code, out = _run("--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True
    assert report["summary"]["cases"] == CASES == report["summary"]["passed"]
    assert report["summary"]["UNACCOUNTED"] == 0
    statuses = {(r["field"], r["status"]) for r in report["coverage"]}
    assert ("OBX-5", "mapped") in statuses and ("OBX-5", "ignored") in statuses  # MDM vs ADT
    assert ("NK1-2", "ignored") in statuses
    case = next(c for c in report["cases"] if c["case"] == "adt_a40_merge")
    assert case == {
        "case": "adt_a40_merge",
        "ok": True,
        "message_type": "ADT^A40",
        "event": "patient-sammanslagning",
        "detail": "",
    }


def _add_z_segment(folder: Path) -> None:
    golden = folder / "golden" / "adt_a02_transfer.hl7"
    golden.write_bytes(golden.read_bytes() + b"ZBR|1|hemligt-varde\r")


def test_an_unaccounted_field_fails(folder: Path) -> None:
    _add_z_segment(folder)
    code, out = _run("--mappings", str(folder))
    assert code == 1
    assert "ZBR-1   UNACCOUNTED" in out and "ZBR-2   UNACCOUNTED" in out
    assert "in: adt_a02_transfer" in out
    assert "2 UNACCOUNTED." in out
    assert "hemligt" not in out  # values are never shown
    report = json.loads(_run("--mappings", str(folder), "--json")[1])
    assert report["ok"] is False
    unaccounted = [r["field"] for r in report["coverage"] if r["status"] == "UNACCOUNTED"]
    assert unaccounted == ["ZBR-1", "ZBR-2"]


def test_ignoring_the_segment_with_a_reason_accounts_for_it(folder: Path) -> None:
    _add_z_segment(folder)
    fields = folder / "fields.toml"
    text = fields.read_text("utf-8") + '"ZBR" = "a site segment the gateway does not need"\n'
    fields.write_text(text, "utf-8")
    code, out = _run("--mappings", str(folder))
    assert code == 0, out
    assert "ZBR-2   ignored" in out and "a site segment" in out


def test_a_changed_bundle_fails_and_names_the_place(folder: Path) -> None:
    expected = folder / "golden" / "ref_i12_rehab.json"
    bundle = json.loads(expected.read_text("utf-8"))
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "ServiceRequest":
            entry["resource"]["priority"] = "stat"
    expected.write_text(json.dumps(bundle), "utf-8")
    code, out = _run("--mappings", str(folder))
    assert code == 1
    assert "FAIL  ref_i12_rehab" in out
    assert ".priority: differs" in out and "routine" not in out


def test_a_rejected_golden_and_a_missing_expectation_fail(folder: Path) -> None:
    (folder / "golden" / "adt_a11_cancel_admit.json").unlink()
    broken = folder / "golden" / "adt_a25_cancel_ready.hl7"
    broken.write_bytes(broken.read_bytes().replace(b"|V2025-0001|", b"||"))
    results = {r.case: r for r in run_cases(folder / "golden", load_mapping(folder))}
    assert not results["adt_a11_cancel_admit"].ok
    assert "--update" in results["adt_a11_cancel_admit"].detail
    assert results["adt_a25_cancel_ready"].detail.startswith("rejected: AE PV1-19 (101)")
    assert sum(r.ok for r in results.values()) == CASES - 2


def test_update_writes_the_expected_bundles(folder: Path) -> None:
    (folder / "golden" / "adt_a11_cancel_admit.json").unlink()
    code, out = _run("--mappings", str(folder), "--update")
    assert code == 0, out
    written = json.loads((folder / "golden" / "adt_a11_cancel_admit.json").read_text("utf-8"))
    shipped = json.loads((TAKECARE / "golden" / "adt_a11_cancel_admit.json").read_text("utf-8"))
    assert written == shipped


def test_coverage_rows_are_per_field_and_status() -> None:
    rows = coverage(TAKECARE / "golden", load_mapping())
    assert rows[0].field == "MSH-1"
    obx5 = [r for r in rows if r.field == "OBX-5"]
    assert {r.status for r in obx5} == {"mapped", "ignored"}
    mapped = next(r for r in obx5 if r.status == "mapped")
    assert mapped.message_types == ["MDM^T02"] and len(mapped.cases) == 4


def test_the_command_is_registered_with_brygga() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "mappings", "test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 UNACCOUNTED." in done.stdout
