"""Kafka keys and pseudonyms: a keyed hash (HMAC-SHA256) of the patient identity.

The same patient always gets the same key, so one patient's messages share a partition and
stay in order, while the key reveals nothing without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from gateway.keyfiles import create_exclusive


class PatientKeyer:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the HMAC secret must be at least 32 bytes")
        self._secret = secret

    def key(self, system: str, value: str) -> str:
        digest = hmac.new(self._secret, f"{system}|{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    @classmethod
    def from_file(cls, path: Path) -> PatientKeyer:
        """Load the secret, creating it (readable by the owner only) on first start."""
        if not path.exists():
            # Exclusive: two processes starting together end up with one secret.
            create_exclusive(path, secrets.token_bytes(32))
        return cls(path.read_bytes())
