"""Run one fuzz target under atheris: ``python -m tests.fuzz.run hl7|mllp [libFuzzer args]``.

Coverage-guided: the adapter and gateway model modules are instrumented. Crashers are
written where ``-artifact_prefix`` says (tests/fuzz/corpus/<target>/ keeps them).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["adapters", "gateway.model"]):
    from tests.fuzz.harness import hl7_one, mllp_one

TARGETS = {"hl7": hl7_one, "mllp": mllp_one}


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
