"""``brygga bench takecare`` runs end to end with tiny counts and prints every row.

A smoke test: it proves the benchmark still works (processes start and stop, the database is
dropped, every ACK is AA), not how fast anything is; no figure is compared with a target.
"""

from __future__ import annotations

import asyncio
import json
import re

from typer.testing import CliRunner

from adapters.takecare.bench import app
from tests.support import pg_admin_dsn

CPU_ROWS = (
    "raw hl7.parse",
    "raw hl7apy parse_message",
    "adapter parse() = parse + map",
    "adapter + to_bundle + JSON (as stored)",
    "adapter + to_bundle + FHIR R4B validation",
)
NUMBER = r"([0-9][0-9,]*(?:\.[0-9]+)?)"


def _bench_databases() -> list[str]:
    import asyncpg

    async def go() -> list[str]:
        conn = await asyncpg.connect(pg_admin_dsn())
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'brygga_bench_%'"
            )
        finally:
            await conn.close()
        return [r["datname"] for r in rows]

    return asyncio.run(go())


def _first_number(line: str, after: str) -> float:
    match = re.search(NUMBER, line.split(after, 1)[1])
    assert match, line
    return float(match.group(1).replace(",", ""))


def test_bench_prints_every_row_with_positive_figures() -> None:
    before = set(_bench_databases())
    result = CliRunner().invoke(
        app,
        [
            "takecare",
            "--seconds",
            "0.25",
            "--connections",
            "2",
            "--rate",
            "40",
            "--pg",
            pg_admin_dsn(),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()

    for label in CPU_ROWS:
        row = next(line for line in lines if f"│ {label} " in line)
        assert _first_number(row, label) > 0, row

    for server in ("bare hl7 + AA", "gateway (intake,relay,api)"):
        rows = [line for line in lines if line.startswith(f"│ {server} ")]
        assert len(rows) == 2, "\n".join(lines)  # closed loop and open loop
        for row in rows:
            cells = [c.strip() for c in row.strip("│").split("│")]
            rate, acks, not_aa, errors = cells[2], cells[7], cells[8], cells[9]
            assert float(rate.replace(",", "")) > 0, row
            assert int(acks.replace(",", "")) > 0, row
            assert (not_aa, errors) == ("0", "0"), row

    assert any("gateway accept rate / bare MLLP server rate" in line for line in lines)
    assert any("p99 ACK latency at 40 msg/s" in line for line in lines)
    assert any(line.startswith("│ gateway ") and "closed loop" in line for line in lines)
    # Everything the bench made is gone.
    assert set(_bench_databases()) <= before


def test_bench_json_cpu_only() -> None:
    result = CliRunner().invoke(app, ["takecare", "--seconds", "0.1", "--skip-accept", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["accept"] is None
    assert [row["label"] for row in doc["cpu"]] == list(CPU_ROWS)
    for row in doc["cpu"]:
        assert row["rate"] > 0 and row["messages"] > 0, row
    assert doc["machine"]["cores"] >= 1
    assert {t["figure"] for t in doc["targets"]} >= {
        "adapter parse() = parse + map, msg/s per core"
    }
