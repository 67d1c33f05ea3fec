"""Swedish patient identifiers: Luhn, samordningsnummer, dates, reservnummer, HSA-id.

The error texts matter as much as the verdicts: they reach logs and ACKs, so they must
never repeat the number they reject.
"""

from __future__ import annotations

import re
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.model.identifiers import (
    IdentifierKind,
    InvalidIdentifier,
    is_hsa_id,
    luhn_check_digit,
    luhn_ok,
    parse_identity_number,
    parse_reservnummer,
)

DIGIT_RUN = re.compile(r"\d{4,}")


def _assert_no_value(exc: InvalidIdentifier, raw: str) -> None:
    text = str(exc)
    digits = re.sub(r"\D", "", raw)
    if len(raw.strip()) >= 4:
        assert raw.strip() not in text
    if len(digits) >= 4:
        assert digits not in text and digits[-10:] not in text
    assert not DIGIT_RUN.search(text), "an error text carries a run of digits"


def _pnr(born: date, serial: int) -> str:
    nine = f"{born:%y%m%d}{serial:03d}"
    return f"{born:%Y%m%d}{serial:03d}{luhn_check_digit(nine)}"


def test_skatteverket_test_number() -> None:
    pid = parse_identity_number("191212121212")
    assert pid.kind is IdentifierKind.PERSONNUMMER
    assert pid.value == "191212121212"


@pytest.mark.parametrize("raw", ["19121212-1212", "19121212+1212", " 191212121212 "])
def test_separators_and_whitespace_are_normalised(raw: str) -> None:
    assert parse_identity_number(raw).value == "191212121212"


def test_luhn_known_values() -> None:
    assert luhn_ok("1212121212")
    assert not luhn_ok("1212121213")
    assert luhn_check_digit("121212121") == "2"
    assert luhn_check_digit("450101234") == "0"


def test_wrong_check_digit() -> None:
    with pytest.raises(InvalidIdentifier, match="check digit") as info:
        parse_identity_number("191212121213")
    _assert_no_value(info.value, "191212121213")


def test_samordningsnummer_is_day_plus_sixty() -> None:
    pid = parse_identity_number("196002751243")  # 1960-02-15, day 15 + 60
    assert pid.kind is IdentifierKind.SAMORDNINGSNUMMER
    assert pid.value == "196002751243"


def test_samordningsnummer_wrong_check_digit_names_its_kind() -> None:
    with pytest.raises(InvalidIdentifier, match="samordningsnummer: check digit"):
        parse_identity_number("196002751244")


@pytest.mark.parametrize(
    "raw",
    [
        "19121312" + "1234",  # month 13
        "19230230" + "1234",  # 30 February
        "19230229" + "1234",  # not a leap year
        "19600290" + "1234",  # samordningsnummer for 30 February
        "19121200" + "1234",  # day 0
    ],
)
def test_invalid_dates(raw: str) -> None:
    with pytest.raises(InvalidIdentifier, match="not a valid date") as info:
        parse_identity_number(raw)
    _assert_no_value(info.value, raw)


def test_leap_day_is_valid() -> None:
    raw = _pnr(date(2000, 2, 29), 123)
    assert parse_identity_number(raw).kind is IdentifierKind.PERSONNUMMER


@pytest.mark.parametrize("raw", ["", "1212121212", "12345", "1912121212121", "abcdefghijkl"])
def test_wrong_format(raw: str) -> None:
    with pytest.raises(InvalidIdentifier, match="12 digits") as info:
        parse_identity_number(raw)
    _assert_no_value(info.value, raw)


def test_reservnummer_allows_letters_and_has_no_check_digit() -> None:
    pid = parse_reservnummer("99250312A123")
    assert pid.kind is IdentifierKind.RESERVNUMMER
    assert pid.value == "99250312A123"


@pytest.mark.parametrize("raw", ["", "ab", "99 25 03", "x" * 21, "9925/0312"])
def test_reservnummer_rejects(raw: str) -> None:
    with pytest.raises(InvalidIdentifier) as info:
        parse_reservnummer(raw)
    if raw.strip():
        assert raw not in str(info.value)


def test_patient_id_never_shows_its_value() -> None:
    pid = parse_identity_number("191212121212")
    assert "1212" not in repr(pid) and "1212" not in str(pid)


def test_hsa_id() -> None:
    assert is_hsa_id("SE2321000016-EX01")
    assert not is_hsa_id("SE2321000016")
    assert not is_hsa_id("EXAMPLE-KS")
    assert not is_hsa_id("SE232100001-EX01")


# --------------------------------------------------------------------------- properties


@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_any_nine_digits_plus_computed_check_digit_validates(nine: str) -> None:
    check = luhn_check_digit(nine)
    assert luhn_ok(nine + check)
    for other in "0123456789":
        if other != check:
            assert not luhn_ok(nine + other)


@given(
    st.dates(min_value=date(1890, 1, 1), max_value=date(2099, 12, 31)),
    st.integers(min_value=0, max_value=999),
    st.booleans(),
)
def test_generated_numbers_validate_and_a_changed_check_digit_fails(
    born: date, serial: int, coordination: bool
) -> None:
    day = born.day + (60 if coordination else 0)
    nine = f"{born:%y%m}{day:02d}{serial:03d}"
    check = luhn_check_digit(nine)
    raw = f"{born:%Y%m}{day:02d}{serial:03d}{check}"
    pid = parse_identity_number(raw)
    expected = IdentifierKind.SAMORDNINGSNUMMER if coordination else IdentifierKind.PERSONNUMMER
    assert pid.kind is expected and pid.value == raw

    wrong = raw[:-1] + str((int(check) + 1) % 10)
    with pytest.raises(InvalidIdentifier, match="check digit") as info:
        parse_identity_number(wrong)
    _assert_no_value(info.value, wrong)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.from_regex(r"\d{6,14}"))
def test_error_text_never_contains_the_input(raw: str) -> None:
    """Whatever is rejected, the text carries no run of digits, so no part of a number."""
    for parser in (parse_identity_number, parse_reservnummer):
        try:
            parser(raw)
        except InvalidIdentifier as exc:
            assert not DIGIT_RUN.search(str(exc))
            digits = re.sub(r"\D", "", raw)
            if len(digits) >= 4:
                assert digits not in str(exc)
