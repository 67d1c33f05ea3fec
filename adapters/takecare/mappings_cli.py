"""``brygga mappings``: golden cases and the coverage report of the TakeCare mappings.

``brygga mappings test`` is what an integration engineer runs after editing
``mappings/takecare/*.toml``: every golden case must still produce its expected Bundle, and
every segment and field present in the golden inputs must be either mapped or explicitly
ignored (``fields.toml``), so nothing TakeCare sends is dropped without a recorded reason.
Output names cases, segments and fields, never field values (goldens could hold real data).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from adapters.takecare.hl7in import Hl7Rejection, Inbound, parse, present_fields
from adapters.takecare.mapping import DEFAULT_DIR, TakeCareMapping, load_mapping
from gateway.model.bundle import read_bundle, to_bundle, validate_bundle

__all__ = ["CaseResult", "CoverageRow", "app", "case_sender", "coverage", "parse_case", "run_cases"]

app = typer.Typer(
    help="Check the TakeCare mappings against their golden cases.", no_args_is_help=True
)


@app.callback()
def mappings_group() -> None:
    """Check the TakeCare mappings against their golden cases."""  # keeps `test` a subcommand


GOLDEN_MESSAGE_ID = "golden"
MAPPED, IGNORED, UNACCOUNTED = "mapped", "ignored", "UNACCOUNTED"


@dataclass(slots=True)
class CaseResult:
    """One golden case: an HL7 message in, the expected Bundle out."""

    case: str
    ok: bool
    message_type: str = ""
    event: str = ""
    detail: str = ""


@dataclass(slots=True)
class CoverageRow:
    """One field (or segment) present in the golden inputs, and how it is accounted for."""

    field: str  # "PID-11"
    status: str  # mapped | ignored | UNACCOUNTED
    reason: str = ""
    message_types: list[str] = dataclasses.field(default_factory=list)
    cases: list[str] = dataclasses.field(default_factory=list)


def _first_difference(got: Any, want: Any, path: str = "") -> str:
    """The path of the first difference between two JSON values (values are not shown)."""
    if isinstance(got, dict) and isinstance(want, dict):
        for key in sorted(set(got) | set(want)):
            if key not in got:
                return f"{path}.{key}: missing"
            if key not in want:
                return f"{path}.{key}: not expected"
            diff = _first_difference(got[key], want[key], f"{path}.{key}")
            if diff:
                return diff
        return ""
    if isinstance(got, list) and isinstance(want, list):
        for i, (a, b) in enumerate(zip(got, want, strict=False)):
            diff = _first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        if len(got) != len(want):
            return f"{path}: {len(got)} items, expected {len(want)}"
        return ""
    return "" if got == want else f"{path or '.'}: differs"


CONNECTION_FILE = "connection.toml"


@functools.cache
def _connections(golden: Path) -> dict[str, dict[str, str]]:
    path = golden / CONNECTION_FILE
    return tomllib.loads(path.read_text("utf-8")) if path.exists() else {}


def case_sender(path: Path) -> str:
    """The sender configured for the connection a golden case arrives on (``connection.toml``
    beside it, as ``BRYGGA_TAKECARE_SENDER``): what stands in for an empty MSH-4."""
    return str(_connections(path.parent).get(path.stem, {}).get("sender", ""))


def case_lus_marker(path: Path) -> str:
    """The connection's ``BRYGGA_TAKECARE_LUS_MARKER`` for a golden case (default optional)."""
    return str(_connections(path.parent).get(path.stem, {}).get("lus_marker", "optional"))


def parse_case(path: Path, mapping: TakeCareMapping) -> Inbound:
    """A golden case parsed as the gateway would on its connection."""
    return parse(
        path.read_bytes(),
        mapping=mapping,
        default_sender=case_sender(path),
        lus_marker=case_lus_marker(path),
    )


def run_cases(golden: Path, mapping: TakeCareMapping, *, update: bool = False) -> list[CaseResult]:
    """Parse each ``*.hl7`` and compare its Bundle with ``*.json`` (``update``: rewrite it)."""
    results: list[CaseResult] = []
    for path in sorted(golden.glob("*.hl7")):
        result = CaseResult(path.stem, ok=False)
        results.append(result)
        try:
            inbound = parse_case(path, mapping)
        except Hl7Rejection as rej:
            result.detail = f"rejected: {rej}"
            continue
        result.message_type = inbound.message_type
        result.event = inbound.canonical.event.value
        bundle = json.loads(json.dumps(to_bundle(inbound.canonical, GOLDEN_MESSAGE_ID)))
        expected_path = path.with_suffix(".json")
        if update:
            text = json.dumps(bundle, ensure_ascii=False, indent=2) + "\n"
            expected_path.write_text(text, "utf-8")
        if not expected_path.exists():
            result.detail = "no expected Bundle (.json); write it with --update and review it"
            continue
        diff = _first_difference(bundle, json.loads(expected_path.read_text("utf-8")))
        if diff:
            result.detail = f"Bundle differs at {diff}"
            continue
        try:
            validate_bundle(bundle)
            read_bundle(bundle)
        except Exception as exc:  # the validator's text may quote values: keep the type
            result.detail = f"not a valid FHIR R4 Bundle ({type(exc).__name__})"
            continue
        result.ok = True
    return results


def coverage(golden: Path, mapping: TakeCareMapping) -> list[CoverageRow]:
    """Every non-empty field of every golden input, as mapped, ignored or UNACCOUNTED."""
    rows: dict[str, CoverageRow] = {}
    for path in sorted(golden.glob("*.hl7")):
        try:
            message_type, _, found = present_fields(path.read_bytes(), mapping)
        except Hl7Rejection:
            continue  # not HL7 at all: the case itself fails in run_cases
        for segment, num in sorted(found):
            status, reason = mapping.account(message_type, segment, num)
            name = f"{segment}-{num}"
            key = f"{name}|{status}|{reason}"
            row = rows.setdefault(key, CoverageRow(name, status, reason))
            if message_type not in row.message_types:
                row.message_types.append(message_type)
            if path.stem not in row.cases:
                row.cases.append(path.stem)

    def order(row: CoverageRow) -> tuple[int, str, int]:
        segment, num = row.field.split("-")
        return (0 if segment == "MSH" else 1, segment, int(num))

    return sorted(rows.values(), key=order)


@app.command("test")
def test_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    mappings: Annotated[
        Path, typer.Option(help="The mapping folder (its golden cases are in golden/).")
    ] = DEFAULT_DIR,
    update: Annotated[
        bool, typer.Option(help="Rewrite every expected Bundle (review with git diff).")
    ] = False,
) -> None:
    """Run the golden cases and the coverage report; exit 1 on a failure or UNACCOUNTED."""
    mapping = load_mapping(mappings)
    golden = mappings / "golden"
    cases = run_cases(golden, mapping, update=update)
    rows = coverage(golden, mapping)
    failed = [c for c in cases if not c.ok]
    unaccounted = [r for r in rows if r.status == UNACCOUNTED]
    summary = {
        "cases": len(cases),
        "passed": len(cases) - len(failed),
        "failed": len(failed),
        "fields": len({r.field for r in rows}),
        MAPPED: sum(r.status == MAPPED for r in rows),
        IGNORED: sum(r.status == IGNORED for r in rows),
        UNACCOUNTED: len(unaccounted),
    }
    ok = bool(cases) and not failed and not unaccounted
    if as_json:
        report = {
            "ok": ok,
            "summary": summary,
            "cases": [asdict(c) for c in cases],
            "coverage": [asdict(r) for r in rows],
        }
        typer.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_report(golden, cases, rows, summary)
    raise typer.Exit(0 if ok else 1)


def _print_report(
    golden: Path, cases: list[CaseResult], rows: list[CoverageRow], summary: dict[str, int]
) -> None:
    typer.echo(f"Golden cases ({golden}):")
    width = max((len(c.case) for c in cases), default=10)
    for c in cases:
        mark = "pass" if c.ok else "FAIL"
        line = f"  {mark}  {c.case:<{width}}  {c.message_type:<8} {c.event}"
        typer.echo(line.rstrip() + (f"\n        {c.detail}" if c.detail else ""))
    if not cases:
        typer.echo("  none found")
    typer.echo("")
    typer.echo("Coverage: every field present in the golden inputs, mapped or ignored")
    for r in rows:
        types = ",".join(sorted({t.split("^")[0] for t in r.message_types}))
        n = len(r.cases)
        why = f"  {r.reason}" if r.reason else ""
        typer.echo(
            f"  {r.field:<7} {r.status:<11} {types:<11} {n:>3} case{'s' if n != 1 else ' '}{why}"
        )
        if r.status == UNACCOUNTED:
            typer.echo(f"          in: {', '.join(r.cases)}")
    typer.echo("")
    typer.echo(
        f"{summary['cases']} cases: {summary['passed']} pass, {summary['failed']} fail. "
        f"{summary['fields']} fields ({len(rows)} verdicts): {summary[MAPPED]} mapped, "
        f"{summary[IGNORED]} ignored, {summary[UNACCOUNTED]} UNACCOUNTED."
    )
