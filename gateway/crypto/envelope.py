"""The ciphertext format: AES-256-GCM under a data key, bound to where the value lives.

Format, version 1 (all values are bytes; the text form is the same bytes in base64)::

    offset  size  field
    0       1     magic 0xB7 (a UTF-8 continuation byte: no UTF-8 text starts with it)
    1       1     version 0x01
    2       16    data-key (DEK) id, the UUID's bytes
    18      12    nonce, random per value
    30      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then the 16-byte tag

The GCM associated data is the 18-byte header followed by the *context*: ``db:<table>.<column>:
<row id>`` for a database value, ``kafka:<topic>:<key>`` for a Kafka record (see
:func:`column_context`, :func:`record_context`). A value copied to another row, column, topic
or key, or a header edited, fails authentication. Errors never carry plaintext or ciphertext.

Random 96-bit nonces are safe for up to 2**32 values per data key (NIST SP 800-38D); at the
gateway's volumes that is decades per key, and keys are rotated long before.
"""

from __future__ import annotations

import base64
import binascii
import os
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = 0xB7
VERSION = 1
HEADER = bytes((MAGIC, VERSION))
DEK_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
PREFIX_SIZE = len(HEADER) + DEK_ID_SIZE  # what identifies the key: magic, version, DEK id
OVERHEAD = PREFIX_SIZE + NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32  # AES-256


class DecryptionError(Exception):
    """A value could not be decrypted: tampered with, moved, or under a key not at hand.

    The text names the context (ids only) and the key id, never the value.
    """


def column_context(label: str, row_id: str) -> bytes:
    """Associated data of a database value: ``label`` is ``table.column``."""
    return f"db:{label}:{row_id}".encode()


def record_context(topic: str, key: bytes | str | None) -> bytes:
    """Associated data of a Kafka record value: its topic and its key."""
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    return f"kafka:{topic}:{key or ''}".encode()


def is_sealed(value: bytes) -> bool:
    """True if ``value`` looks like an envelope (it may still fail to open)."""
    return len(value) >= OVERHEAD and value[0] == MAGIC


def raw_dek_id(value: bytes) -> bytes:
    """The 16 bytes naming the data key of a sealed value (unchecked)."""
    return value[len(HEADER) : PREFIX_SIZE]


def dek_id_of(value: bytes) -> str:
    """The id of the data key a sealed value is encrypted under."""
    _check(value)
    return str(uuid.UUID(bytes=raw_dek_id(value)))


def key_prefix(dek_id: str) -> bytes:
    """The first bytes of every value sealed under ``dek_id`` (for finding old rows)."""
    return HEADER + uuid.UUID(dek_id).bytes


def seal(aead: AESGCM, dek_id: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt ``plaintext`` under the data key ``aead`` whose 16-byte id is ``dek_id``."""
    prefix = HEADER + dek_id
    nonce = os.urandom(NONCE_SIZE)
    return prefix + nonce + aead.encrypt(nonce, plaintext, prefix + context)


def open_sealed(aead: AESGCM, value: bytes, context: bytes) -> bytes:
    """Decrypt a value from :func:`seal`; :class:`DecryptionError` if it does not verify."""
    _check(value)
    prefix = value[:PREFIX_SIZE]
    try:
        return aead.decrypt(
            value[PREFIX_SIZE : PREFIX_SIZE + NONCE_SIZE],
            value[PREFIX_SIZE + NONCE_SIZE :],
            prefix + context,
        )
    except InvalidTag:
        raise DecryptionError(
            f"value under data key {dek_id_of(value)} failed authentication for "
            f"{_printable(context)}: altered, or moved from another place"
        ) from None


def to_text(value: bytes) -> str:
    """The text form of a sealed value, for TEXT columns."""
    return base64.b64encode(value).decode("ascii")


def from_text(text: str) -> bytes | None:
    """The bytes of a sealed value in text form; None if ``text`` is not one."""
    if not text or text[0] != "t":  # base64 of 0xB7 starts with "t"
        return None
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return value if is_sealed(value) else None


def _check(value: bytes) -> None:
    if not is_sealed(value):
        raise DecryptionError("not an encrypted value (no envelope header)")
    if value[1] != VERSION:
        raise DecryptionError(f"envelope version {value[1]} is not supported by this gateway")


def _printable(context: bytes) -> str:
    return context.decode("utf-8", "replace")[:200]
