"""Key-encryption keys (KEKs): what wraps the data keys stored in ``data_keys``.

A :class:`KekProvider` wraps and unwraps 32-byte data keys. The gateway ships one
implementation, :class:`LocalKek`: AES-256-GCM keys held by the process, read from
``BRYGGA_KEK`` (base64) or from the file ``<data dir>/keys/kek.key`` (created, readable by
the owner only, on first start).

Several keys may be configured: the first is the *current* one (it wraps new data keys);
the others are *previous* ones, kept only so that data keys not yet re-wrapped stay
readable during a KEK rotation (``brygga keys rotate --kek``). In the file they are one
base64 key per line; in ``BRYGGA_KEK`` they are separated by commas or whitespace.

A KMS or HSM (where the KEK never leaves the service) is a class with the same four
members, registered in the entry point group ``brygga.kek`` and chosen with
``BRYGGA_KEK_PROVIDER=<entry point name>``; the entry point is called with the
:class:`~gateway.settings.Settings`. Its ``wrap``/``unwrap`` are called once per data key
per process (at start, at a rotation), in a worker thread, so a network call is fine. No
such class is built yet; see docs/decisions/0007-envelope-encryption.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto.envelope import KEY_SIZE, NONCE_SIZE
from gateway.keyfiles import create_exclusive

if TYPE_CHECKING:
    from gateway.settings import Settings

KEK_FILE = "kek.key"


class KeyUnavailable(Exception):
    """A key needed to read data is not configured in this process (no key material in text)."""


@runtime_checkable
class KekProvider(Protocol):
    """Wraps data keys. ``key_id`` names the key ``wrap`` uses; it is stored with each DEK."""

    @property
    def key_id(self) -> str: ...

    def wrap(self, dek: bytes, dek_id: str) -> bytes:
        """The data key encrypted under the current KEK, bound to ``dek_id``."""
        ...

    def unwrap(self, wrapped: bytes, dek_id: str, kek_id: str) -> bytes:
        """The data key; :class:`KeyUnavailable` if ``kek_id`` is not at hand."""
        ...

    def reload(self) -> None:
        """Pick up keys changed outside this process (a rotated key file, a new KMS version)."""
        ...


def kek_id_of(key: bytes) -> str:
    """A public name for a local KEK: a hash of it (reveals nothing of a random 256-bit key)."""
    return "local-" + hashlib.sha256(b"brygga kek id\x00" + key).hexdigest()[:16]


def _context(dek_id: str, kek_id: str) -> bytes:
    return f"dek:{dek_id}:{kek_id}".encode()


def parse_keys(text: str) -> list[bytes]:
    """Base64 keys separated by commas or whitespace, in order; each must be 32 bytes."""
    keys = []
    for part in re.split(r"[\s,]+", text.strip()):
        if not part:
            continue
        try:
            key = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a KEK is not valid base64") from None
        if len(key) != KEY_SIZE:
            raise ValueError(f"a KEK must be {KEY_SIZE} bytes (base64 of {KEY_SIZE} random bytes)")
        keys.append(key)
    if not keys:
        raise ValueError("no KEK given")
    return keys


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def encode_keys(keys: Sequence[bytes]) -> str:
    return "".join(base64.b64encode(k).decode() + "\n" for k in keys)


class LocalKek:
    """KEKs held in this process: from a file (re-read on :meth:`reload`) or from text."""

    def __init__(self, keys: Sequence[bytes], path: Path | None = None) -> None:
        self.path = path
        self._set(keys)

    def _set(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("no KEK given")
        self._keys = {kek_id_of(k): AESGCM(k) for k in keys}
        self._current = kek_id_of(keys[0])

    @classmethod
    def generate(cls) -> LocalKek:
        """A fresh in-memory KEK (tests, tools)."""
        return cls([new_key()])

    @classmethod
    def from_text(cls, text: str) -> LocalKek:
        return cls(parse_keys(text))

    @classmethod
    def from_file(cls, path: Path, *, create: bool = True) -> LocalKek:
        """Load the key file, creating it (mode 0600) on first start when ``create``."""
        if not path.exists():
            if not create:
                raise FileNotFoundError(
                    f"no key-encryption key at {path}: start the gateway once (it creates one) "
                    "or set BRYGGA_KEK"
                )
            create_exclusive(path, encode_keys([new_key()]).encode())
        return cls(parse_keys(path.read_text()), path)

    @property
    def key_id(self) -> str:
        return self._current

    @property
    def key_ids(self) -> list[str]:
        """Every configured KEK id, the current one first."""
        return [self._current, *(k for k in self._keys if k != self._current)]

    def wrap(self, dek: bytes, dek_id: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._keys[self._current].encrypt(
            nonce, dek, _context(dek_id, self._current)
        )

    def unwrap(self, wrapped: bytes, dek_id: str, kek_id: str) -> bytes:
        aead = self._keys.get(kek_id)
        if aead is None:
            self.reload()
            aead = self._keys.get(kek_id)
        if aead is None:
            raise KeyUnavailable(
                f"data key {dek_id} is wrapped under KEK {kek_id}, which this process does not "
                f"have (it has {', '.join(self.key_ids)}). Every process of one gateway needs "
                "the same KEK: copy keys/kek.key or set BRYGGA_KEK."
            )
        nonce, sealed = wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:]
        try:
            return aead.decrypt(nonce, sealed, _context(dek_id, kek_id))
        except InvalidTag:
            raise KeyUnavailable(f"data key {dek_id} does not unwrap under KEK {kek_id}") from None

    def reload(self) -> None:
        if self.path is not None and self.path.exists():
            with contextlib.suppress(ValueError, OSError):  # a half-edited file: keep what we have
                self._set(parse_keys(self.path.read_text()))


def write_key_file(path: Path, keys: Sequence[bytes]) -> None:
    """Replace ``path`` with ``keys`` (current first), mode 0600, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(encode_keys(keys))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def kek_path(settings: Settings) -> Path:
    return settings.kek_file or settings.keys_dir / KEK_FILE


def from_settings(settings: Settings, *, create: bool = True) -> KekProvider:
    """The configured provider: ``BRYGGA_KEK``, else the key file, else a plugged-in KMS."""
    if settings.kek_provider != "local":
        found = {ep.name: ep for ep in entry_points(group="brygga.kek")}
        if settings.kek_provider not in found:
            raise ValueError(
                f"no KEK provider {settings.kek_provider!r} is installed "
                f"(entry point group brygga.kek has: {sorted(found) or 'none'})"
            )
        provider: KekProvider = found[settings.kek_provider].load()(settings)
        return provider
    if settings.kek is not None:
        return LocalKek.from_text(settings.kek.get_secret_value())
    return LocalKek.from_file(kek_path(settings), create=create)
