"""The fault figures: printed at the end of the run, and appended as one JSON line per
scenario to ``$BRYGGA_CHAOS_RESULTS`` (default ``var/chaos-results.jsonl``), from which
``python -m tests.chaos.figures FILE`` prints the table in docs/reliability.md."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_ENV = "BRYGGA_CHAOS_RESULTS"
collected: list[dict[str, Any]] = []  # this session's, for the terminal summary

COLUMNS = (
    ("scenario", "Scenario"),
    ("broker", "Broker"),
    ("faults", "What was killed, when"),
    ("load", "Load"),
    ("lost", "Lost"),
    ("duplicated", "Delivered twice"),
    ("stuck", "Stuck"),
    ("parked", "Parked"),
    ("intake_gap_s", "Intake gap (s)"),
    ("recovery_s", "Recovery (s)"),
)


def results_file() -> Path:
    return Path(os.environ.get(RESULTS_ENV, "var/chaos-results.jsonl"))


def record(figures: dict[str, Any]) -> None:
    """Keep one scenario's figures: in memory, in the results file, and on stdout."""
    figures = {"at": datetime.now(UTC).isoformat(timespec="seconds"), **figures}
    collected.append(figures)
    path = results_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(figures, sort_keys=True) + "\n")
    print(json.dumps(figures, sort_keys=True))


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "faults":
        return "; ".join(f"{f['what']} at {f['at_s']:.0f} s ({f['acked']} ACKed)" for f in row[key])
    if key == "load":
        return (
            f"{row['admissions']} admissions, {row['connections']} MLLP conn., "
            f"{row['rate']:g}/s, {row['resent_messages']} resent"
        )
    value = row.get(key, "–")
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the figures."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else results_file()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
