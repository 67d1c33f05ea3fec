"""Mappings are data: field maps, code maps, routing rules, directories, golden cases."""

from pathlib import Path

MAPPINGS_DIR = Path(__file__).parent
