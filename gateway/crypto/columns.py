"""Encrypted columns: patient data is encrypted at the store's edge, so stages never see it.

Reading is transparent. An encrypted column's type (:class:`EncryptedBytes`,
:class:`EncryptedText`) changes what a SELECT asks for: instead of ``raw`` it selects
``id || 0x1F || raw`` (its ``column_expression``), so the result processor knows which row a
value came from and decrypts it with that row's associated data (``db:messages.raw:<id>``).
A ciphertext copied into another row or column fails to decrypt. Stages keep writing
``select(messages.c.canonical)`` and get the Bundle JSON back.

Writing is explicit, because a bind parameter does not know its row: :func:`seal_row`
encrypts the encrypted columns of a row's values (it needs the row's ``id``); the store's
insert helpers call it (:mod:`gateway.store.batch`, :func:`gateway.store.sql.insert_ignore`).
An encrypted column refuses anything not sealed, so plaintext can never be written by
accident.

Rows written before encryption (schema 0004) hold plaintext; they are read as they are while
:attr:`FieldCipher.allow_plaintext` is true, until ``brygga keys reencrypt`` has sealed them.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import LargeBinary, Table, Text, func, literal, type_coerce
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement, Label
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.types import TypeDecorator, TypeEngine

from gateway.crypto.envelope import DecryptionError, column_context, from_text, is_sealed, to_text

SEPARATOR = "\x1f"  # between the row id and the stored value in a SELECT; never in an id


class FieldCipher(Protocol):
    """What encrypted values need from the process's keyring (:class:`Keyring`)."""

    allow_plaintext: bool

    def seal(self, plaintext: bytes, context: bytes) -> bytes: ...

    def open(self, value: bytes, context: bytes) -> bytes: ...

    async def prepare(self, value: bytes) -> None:
        """Load the key of ``value`` ahead of :meth:`open`, without blocking the loop."""
        ...


_cipher: FieldCipher | None = None


def install(cipher: FieldCipher | None) -> None:
    """Make ``cipher`` the process's keyring (the gateway does this at start)."""
    global _cipher
    _cipher = cipher


def current() -> FieldCipher:
    if _cipher is None:
        raise RuntimeError(
            "no keyring installed: encrypted columns are read and written only after "
            "gateway.crypto.columns.install(Keyring) (Gateway.start does it)"
        )
    return _cipher


class Sealed(bytes):
    """A value already encrypted for one row's column; the only thing such a column takes."""

    __slots__ = ()


class SealedText(str):
    """The text form of a :class:`Sealed` value, for TEXT columns."""

    __slots__ = ()


class _Encrypted(TypeDecorator[Any]):
    """Base of the encrypted column types. ``label`` is ``table.column``, the AAD's name.

    Subclasses say how the stored form looks: the type a sealed value has when it is
    written (``sealed_type``), and how to split and unwrap a value as a SELECT returns it.
    """

    cache_ok = True
    sealed_type: type[Any]

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def seal(self, row_id: str, value: str | bytes) -> Any:
        """``value`` encrypted for the row ``row_id`` of this column, ready to be written."""
        if SEPARATOR in row_id:
            raise ValueError(f"a row id of {self.label} contains the separator 0x1F")
        data = value.encode() if isinstance(value, str) else value
        return self._stored(current().seal(data, column_context(self.label, row_id)))

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None or type(value) is self.sealed_type:
            return value
        raise TypeError(
            f"{self.label} is encrypted: write it with gateway.crypto.columns.seal_row() "
            f"(got {type(value).__name__})"
        )

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        row_id, stored = self._split(value)
        sealed = self._envelope(stored)
        if sealed is None:
            return _legacy(self.label, stored)
        return self._plain(current().open(sealed, column_context(self.label, row_id)))

    def column_expression(self, colexpr: ColumnElement[Any]) -> ColumnElement[Any]:
        inner = colexpr.element if isinstance(colexpr, Label) else colexpr
        table = getattr(inner, "table", None)
        if table is None or "id" not in table.c:
            raise ValueError(f"{self.label} can only be selected with its table's id at hand")
        impl = self.impl_instance
        bound = type_coerce(_WithRowId(table.c.id, type_coerce(inner, impl), type_=impl), self)
        return bound.label(colexpr.name) if isinstance(colexpr, Label) else bound

    def _stored(self, sealed: bytes) -> Any:
        raise NotImplementedError

    def _split(self, value: Any) -> tuple[str, Any]:
        raise NotImplementedError

    def _envelope(self, stored: Any) -> bytes | None:
        raise NotImplementedError

    def _plain(self, plaintext: bytes) -> Any:
        raise NotImplementedError


class EncryptedBytes(_Encrypted):
    """A BLOB/BYTEA column holding a sealed value; reads give the plaintext bytes."""

    impl = LargeBinary
    cache_ok = True
    sealed_type = Sealed

    def _stored(self, sealed: bytes) -> Sealed:
        return Sealed(sealed)

    def _split(self, value: Any) -> tuple[str, bytes]:
        row_id, _, stored = bytes(value).partition(SEPARATOR.encode())
        return row_id.decode(), stored

    def _envelope(self, stored: bytes) -> bytes | None:
        return stored if is_sealed(stored) else None

    def _plain(self, plaintext: bytes) -> bytes:
        return plaintext


class EncryptedText(_Encrypted):
    """A TEXT column holding a sealed value in base64; reads give the plaintext text (UTF-8).

    TEXT rather than BYTEA so that the upgrade needs no table rewrite (PostgreSQL) or table
    copy (SQLite); the base64 costs a third more space and a few microseconds per value.
    """

    impl = Text
    cache_ok = True
    sealed_type = SealedText

    def _stored(self, sealed: bytes) -> SealedText:
        return SealedText(to_text(sealed))

    def _split(self, value: Any) -> tuple[str, str]:
        row_id, _, stored = str(value).partition(SEPARATOR)
        return row_id, stored

    def _envelope(self, stored: str) -> bytes | None:
        return from_text(stored)

    def _plain(self, plaintext: bytes) -> str:
        return plaintext.decode()


def _legacy(label: str, stored: Any) -> Any:
    if current().allow_plaintext:
        return stored
    raise DecryptionError(f"{label} holds a value that is not encrypted, and plaintext is refused")


class _WithRowId(GenericFunction[Any]):
    """``row id || 0x1F || value`` in the dialect's own way (bytes stay bytes)."""

    name = "brygga_with_row_id"
    inherit_cache = True


@compiles(_WithRowId, "postgresql")
def _with_row_id_pg(element: _WithRowId, compiler: SQLCompiler, **kw: Any) -> str:
    row_id, value = (compiler.process(c, **kw) for c in element.clauses)
    if isinstance(element.type, LargeBinary):
        return f"(convert_to({row_id}, 'UTF8') || '\\x1f'::bytea || {value})"
    return f"({row_id} || chr(31) || {value})"


@compiles(_WithRowId)
def _with_row_id_sqlite(element: _WithRowId, compiler: SQLCompiler, **kw: Any) -> str:
    row_id, value = (compiler.process(c, **kw) for c in element.clauses)
    if isinstance(element.type, LargeBinary):  # SQLite's || gives text: cast back, bytes intact
        return f"CAST(CAST({row_id} AS BLOB) || X'1F' || {value} AS BLOB)"
    return f"({row_id} || char(31) || {value})"


def encrypted_columns(table: Table) -> tuple[str, ...]:
    """Names of ``table``'s encrypted columns."""
    cached = table.info.get("encrypted_columns")
    if cached is None:
        cached = table.info["encrypted_columns"] = tuple(
            c.name for c in table.columns if isinstance(c.type, _Encrypted)
        )
    return cached  # type: ignore[no-any-return]


def seal_row(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every encrypted column of ``table`` sealed for the row ``values["id"]``.

    Values already sealed, and None, are left as they are. Returns a new dict.
    """
    names = encrypted_columns(table)
    if not names:
        return values
    out = dict(values)
    row_id = str(values["id"])
    for name in names:
        value = out.get(name)
        if value is not None and type(value) not in (Sealed, SealedText):
            out[name] = table.c[name].type.seal(row_id, value)
    return out


def stored_prefix(column_type: TypeEngine[Any], prefix: bytes) -> Any:
    """``prefix`` (bytes) as the stored form of ``column_type`` starts with it: for SQL."""
    if isinstance(column_type, EncryptedText):
        return literal(to_text(prefix), Text)
    return literal(prefix, LargeBinary)


def stored(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The column as stored (ciphertext), bypassing decryption."""
    return type_coerce(column, column.type.impl_instance)  # type: ignore[attr-defined]


def starts_with(column: ColumnElement[Any], prefix: bytes) -> ColumnElement[bool]:
    """SQL: the stored value of an encrypted column begins with the sealed-value ``prefix``."""
    expected = stored_prefix(column.type, prefix)
    size = len(expected.value)
    return func.substr(stored(column), 1, size) == expected
