"""Replay the fuzzing corpus through the fuzz targets: the seeds (golden cases and the
public HL7 v2 corpus) and every input a fuzz run ever found failing (tests/fuzz/corpus/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mappings import MAPPINGS_DIR
from tests.fuzz.harness import hl7_one, mllp_one

HERE = Path(__file__).parent


def _found(target: str) -> list[Path]:
    """What fuzz runs kept for ``target`` (crashers, hangs, hand-made seeds)."""
    return [p for p in (HERE / "corpus" / target).iterdir() if not p.name.startswith(".")]


HL7_INPUTS = sorted(
    [
        *(MAPPINGS_DIR / "takecare" / "golden").glob("*.hl7"),
        *(HERE.parent / "corpus" / "hl7v2").rglob("*.hl7"),
        *_found("hl7"),
    ]
)
MLLP_INPUTS = sorted(_found("mllp"))


def test_the_corpus_is_there() -> None:
    assert len(HL7_INPUTS) > 150 and MLLP_INPUTS


@pytest.mark.parametrize("path", HL7_INPUTS, ids=lambda p: p.name)
def test_hl7_input(path: Path) -> None:
    hl7_one(path.read_bytes())


@pytest.mark.parametrize("path", MLLP_INPUTS, ids=lambda p: p.name)
def test_mllp_input(path: Path) -> None:
    mllp_one(path.read_bytes())
