"""Private key files under the data directory: created readable by the owner only, at once.

A key file is written to a temporary name with mode 0600 and then hard-linked to its final
name, which fails if another process got there first; so two processes starting together end
up with the same key, and no other user can read it even for a moment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def create_exclusive(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` (mode 0600) unless the file exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ed25519_private_key(path: Path, *, create: bool) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PKCS#8 PEM), creating it first when allowed."""
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no key file at {path}")
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        create_exclusive(path, pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def ed25519_public_key(path: Path) -> Ed25519PublicKey:
    """A public key from a PEM file (``SubjectPublicKeyInfo``) or from a private key file."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return private.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
