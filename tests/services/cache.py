"""Tools the tests fetch once and keep: Apache Kafka's jars (Maven), the FHIR validator's
npm packages. Each lives in ``~/.cache/brygga/<name>-<recipe hash>``: a changed recipe (pom,
package-lock) builds anew, and two test sessions building at once take turns."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_dir(name: str, recipe: Path) -> Path:
    """The folder of ``name`` built from ``recipe`` (its hash names the folder)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(recipe.read_bytes()).hexdigest()[:8]
    return base / "brygga" / f"{name}-{digest}"


def built(home: Path, product: str, build: Callable[[Path], None]) -> Path:
    """``home/product``, made once by ``build(folder)`` into an empty folder and moved into
    place only when complete: an interrupted build is started again, never half used."""
    target = home / product
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            partial = home / f"{product}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            build(partial)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            (target / ".complete").touch()
    return target
