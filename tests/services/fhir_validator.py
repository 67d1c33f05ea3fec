"""An independent FHIR R4 validator for tests: Node running ``fhir-validator/validate.js``.

Not the gateway's own models (fhir.resources): the official R4 JSON schema (ajv), every R4
invariant of the R4 StructureDefinitions evaluated by fhirpath.js, and the Bundle rules
(every reference resolves inside the Bundle, §2.36.4.1; every entry of a message reachable
from its MessageHeader). The npm packages are pinned by ``package-lock.json``; ``npm ci``
installs them once into ``~/.cache/brygga/fhir-validator-<lock hash>`` (offline afterwards).
One Node process per test session answers every call (its start, ~4 s, is paid once).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.services import cache as services_cache

HERE = Path(__file__).with_name("fhir-validator")
LOCK = HERE / "package-lock.json"
SCRIPT = HERE / "validate.js"


@dataclass
class Report:
    """What the validator found in one Bundle: errors fail it, warnings do not."""

    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def keys(self) -> set[str]:
        """The failed checks' keys (invariant keys, ``bundle-resolution``, ``message-focus``)."""
        return {e["key"] for e in self.errors}

    def text(self) -> str:
        return "\n".join(
            f"{e['check']} {e['key']} at {e['path']}: {e['message']}" for e in self.errors
        )


def node_modules() -> Path:
    """The pinned packages, installed with ``npm ci`` on first use (then cached)."""

    def install(folder: Path) -> None:
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(HERE / name, folder / name)
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=folder, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed for the FHIR validator:\n{done.stderr[-3000:]}")

    home = services_cache.cache_dir("fhir-validator", LOCK)
    return services_cache.built(home, "npm", install) / "node_modules"


_node: subprocess.Popen[str] | None = None
_lock = threading.Lock()


def _process() -> subprocess.Popen[str]:
    global _node
    if _node is None or _node.poll() is not None:
        _node = subprocess.Popen(
            ["node", str(SCRIPT)],
            env={**os.environ, "NODE_PATH": str(node_modules())},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
        )  # fmt: skip
        atexit.register(_node.kill)
    return _node


def validate(bundles: list[dict[str, Any]]) -> list[Report]:
    """One report per Bundle, in order."""
    with _lock:
        node = _process()
        assert node.stdin is not None and node.stdout is not None
        node.stdin.write(json.dumps(bundles) + "\n")
        node.stdin.flush()
        line = node.stdout.readline()
    if not line:
        raise RuntimeError(f"the FHIR validator stopped (exit code {node.poll()})")
    answer = json.loads(line)
    if isinstance(answer, dict):
        raise RuntimeError(f"the FHIR validator failed:\n{answer['failure']}")
    return [Report(r["errors"], r["warnings"]) for r in answer]
