"""Who must be told, from where the patient lives (decision 0016).

The folkbokföringsadress (PID-11) is carried in the Bundle; the patient's municipality (its
code, else the postcode table) and, in Stockholm city, the district decide the needs
assessment that receives the notice, without the sender naming it in ROL. The address goes
only to the roles that need it, to nobody for a protected identity, and is stored only
encrypted. Routing runs in-process on SQLite and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text

from adapters.takecare.hl7in import parse
from gateway.directory import Directory, Organisation
from gateway.directory.residence import (
    POSTCODES_FILE,
    PostcodeError,
    PostcodeTable,
    Residence,
    lookup_from,
)
from gateway.model.bundle import Address, CareParty, read_bundle, to_bundle, withhold
from gateway.model.events import LusEvent
from gateway.pipeline import inbox
from gateway.runtime import directory_path
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages, metadata
from mappings import MAPPINGS_DIR
from tests.conftest import RunningClock
from tests.inprocess import HOME_CARE, Pipeline, canonical

TABLE = PostcodeTable.load()
SKARHOLMEN_BISTAND = "SE2120001637-B020"
HUDDINGE_BISTAND = "SE2120001744-B100"
SABO = "SE2120001637-S030"
STREET = "Qvarnbacksgränd 17"  # found nowhere else in the database if it leaks


def _directory() -> Directory:
    """The demo directory, plus Huddinge's needs assessment (for the whole municipality)."""
    demo = Directory.load(directory_path(Settings()))
    huddinge = Organisation(
        HUDDINGE_BISTAND, "Biståndsenheten Huddinge", "needs-assessment", "0126"
    )
    return Directory([*demo.organisations, huddinge], demo.municipalities)


# --- the postcode table -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _in_office_hours(office_hours: RunningClock) -> RunningClock:
    """Route in office hours: at night a closed unit's notice also goes to its on-call unit at
    once (decision 0019), which these tests are not about."""
    return office_hours


def test_the_shipped_table_places_every_stockholm_district_and_county_municipality() -> None:
    districts = {a.district for a in TABLE._areas.values() if a.municipality == "0180"}
    assert len(districts) == 13  # Stockholm city's thirteen stadsdelsområden
    assert {a.municipality for a in TABLE._areas.values()} == set(TABLE.municipalities)
    assert len(TABLE.municipalities) == 26  # the county's municipalities
    assert TABLE.place("127 43") == Residence("0180", "Skärholmen")
    assert TABLE.place("14131") == Residence("0126")
    assert TABLE.place("99999") is None
    assert TABLE.place("") is None and TABLE.place("SE-111") is None


@given(st.sampled_from(sorted(TABLE._areas)), st.integers(0, 99))
def test_a_postcode_falls_in_the_area_of_its_listed_prefix(prefix: str, rest: int) -> None:
    postcode = (prefix + f"{rest:02d}")[:5]
    assert TABLE.place(postcode) == TABLE._areas[prefix]
    assert TABLE.place(f"{postcode[:3]} {postcode[3:]}") == TABLE._areas[prefix]


@given(st.from_regex(r"\d{5}", fullmatch=True), st.from_regex(r"\d{4}", fullmatch=True))
def test_a_municipality_code_sent_wins_and_the_postcode_only_adds_its_district(
    postcode: str, code: str
) -> None:
    area = TABLE.place(postcode)
    found = TABLE.residence(Address(postal_code=postcode, municipality=code))
    assert found is not None and found.municipality == code
    assert found.district == (area.district if area and area.municipality == code else "")
    assert TABLE.residence(Address(postal_code=postcode)) == area


def test_a_longer_prefix_overrides_its_area(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[municipalities]\n"0180" = "Stockholm"\n"0126" = "Huddinge"\n'
        '[[area]]\npostcodes = ["127"]\nmunicipality = "0180"\ndistrict = "Skärholmen"\n'
        '[[area]]\npostcodes = ["12749"]\nmunicipality = "0126"\n',
        encoding="utf-8",
    )
    table = PostcodeTable.load(path)
    assert table.place("12748") == Residence("0180", "Skärholmen")
    assert table.place("12749") == Residence("0126")


@pytest.mark.parametrize(
    "body,fragment",
    [
        ('[[area]]\npostcodes = ["127"]\nmunicipality = "0180"\n', "not in [municipalities]"),
        ('[municipalities]\n"0180" = "S"\n[[area]]\nmunicipality = "0180"\n', "postcodes"),
        (
            '[municipalities]\n"0180" = "S"\n[[area]]\npostcodes = ["12a"]\n'
            'municipality = "0180"\n',
            "1-5 digits",
        ),
        (
            '[municipalities]\n"0180" = "S"\n[[area]]\npostcodes = ["127", "127"]\n'
            'municipality = "0180"\n',
            "twice",
        ),
    ],
)
def test_a_wrong_table_stops_the_start_saying_where(
    tmp_path: Path, body: str, fragment: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(PostcodeError, match="area #1") as err:
        PostcodeTable.load(path)
    assert fragment in str(err.value)


def test_configuration_picks_the_lookup() -> None:
    assert isinstance(lookup_from("table"), PostcodeTable)
    assert isinstance(lookup_from("table", POSTCODES_FILE), PostcodeTable)
    with pytest.raises(ValueError, match="no residence lookup 'folkbokforingen'"):
        lookup_from("folkbokforingen")


# --- PID-11 into the Bundle and back ----------------------------------------------------


@given(
    st.builds(
        Address,
        line=st.lists(st.text(min_size=1, max_size=20), max_size=2).map(tuple),
        city=st.text(max_size=20),
        postal_code=st.from_regex(r"\d{5}", fullmatch=True) | st.just(""),
        municipality=st.from_regex(r"\d{4}", fullmatch=True) | st.just(""),
        country=st.sampled_from(["", "SE"]),
    )
)
def test_the_address_survives_the_bundle(address: Address) -> None:
    bundle = to_bundle(dataclasses.replace(canonical(), address=address))
    assert read_bundle(bundle).address == address
    assert "address" in read_bundle(bundle).contents
    patient = next(
        e["resource"]
        for e in withhold(bundle, ["address"])["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )
    assert "address" not in patient
    assert read_bundle(withhold(bundle, ["address"])).address is None


def _golden(name: str) -> Address | None:
    raw = (MAPPINGS_DIR / "takecare" / "golden" / f"{name}.hl7").read_bytes()
    return read_bundle(to_bundle(parse(raw).canonical)).address


def test_pid11_takes_the_legal_address_and_its_municipality_code() -> None:
    assert _golden("adt_a01_address_kommunkod") == Address(
        ("Sjövägen 4", "lgh 1102"), "Huddinge", "14131", "0126", "SE"
    )
    assert _golden("adt_a01_address_postcode") == Address(
        ("Bredängsvägen 210",), "Skärholmen", "12732", "", "SE"
    )
    assert TABLE.residence(_golden("adt_a01_address_postcode")) == Residence("0180", "Skärholmen")


# --- routing, on both databases ---------------------------------------------------------


def _message(n: int, address: Address | None, **kw: Any) -> Any:
    return dataclasses.replace(canonical(n, **kw), address=address)


async def _deliveries(db: Database, mid: str) -> dict[str, Any]:
    async with db.read() as conn:
        rows = (await conn.execute(select(deliveries).where(deliveries.c.message_id == mid))).all()
    return {r.recipient_hsa_id: r for r in rows}


HOME = [CareParty("hemtjanst", HOME_CARE, "HT")]


async def test_the_municipality_code_decides_the_needs_assessment(db: Database) -> None:
    pipeline = Pipeline(db, directory=_directory())
    address = Address(("Sjövägen 4",), "Huddinge", "14131", "0126")
    mid = await pipeline.run(_message(1, address, parties=HOME), "RES-1")
    got = await _deliveries(db, mid)
    assert got[HUDDINGE_BISTAND].role == "bistand"
    assert not got[HUDDINGE_BISTAND].for_information  # the admission rule: must act
    assert got[HUDDINGE_BISTAND].state == "delivered"
    assert SKARHOLMEN_BISTAND not in got


async def test_a_postcode_in_a_stockholm_district_finds_the_districts_unit(db: Database) -> None:
    pipeline = Pipeline(db, directory=_directory())
    address = Address(("Bredängsvägen 210",), "Skärholmen", "12732")
    mid = await pipeline.run(_message(2, address, parties=HOME), "RES-2")
    got = await _deliveries(db, mid)
    assert got[SKARHOLMEN_BISTAND].role == "bistand"
    assert got[SKARHOLMEN_BISTAND].state == "delivered"
    assert HUDDINGE_BISTAND not in got


async def test_a_unit_named_in_rol_and_found_by_residence_is_told_once(db: Database) -> None:
    pipeline = Pipeline(db, directory=_directory())
    named = [*HOME, CareParty("bistand", SKARHOLMEN_BISTAND, "BE")]
    mid = await pipeline.run(_message(3, Address(postal_code="12743"), parties=named), "RES-3")
    got = await _deliveries(db, mid)
    assert [h for h in got if got[h].role == "bistand"] == [SKARHOLMEN_BISTAND]


@pytest.mark.parametrize(
    "address,recipient,reason",
    [
        (Address(postal_code="99999"), "bistand@okänd", "kunde inte bestämmas"),
        (Address(), "bistand@okänd", "kunde inte bestämmas"),
        (Address(postal_code="18131"), "bistand@0186", "kommun 0186"),  # Lidingö: no unit
        (Address(municipality="0180"), "bistand@0180", "kommun 0180"),  # no district
    ],
    ids=["unknown-postcode", "empty-address", "no-unit", "no-district"],
)
async def test_a_residence_without_a_unit_is_a_visible_failure(
    db: Database, address: Address, recipient: str, reason: str
) -> None:
    pipeline = Pipeline(db, directory=_directory())
    mid = await pipeline.run(_message(4, address, parties=HOME), "RES-4")
    got = await _deliveries(db, mid)
    assert got[recipient].state == "failed"
    assert reason in got[recipient].detail
    assert got[HOME_CARE].state == "delivered"  # the others are told regardless
    assert await pipeline.status(mid) == "routed"
    assert "99999" not in got[recipient].detail and "18131" not in got[recipient].detail
    await pipeline.follow_up()  # a failed delivery escalates at once
    assert (await _deliveries(db, mid))[recipient].escalation_level >= 1


async def test_a_failure_is_not_raised_when_rol_names_the_role(db: Database) -> None:
    pipeline = Pipeline(db, directory=_directory())
    named = [*HOME, CareParty("bistand", SKARHOLMEN_BISTAND, "BE")]
    mid = await pipeline.run(_message(5, Address(postal_code="99999"), parties=named), "RES-5")
    got = await _deliveries(db, mid)
    assert set(got) == {"SE2321000016-V010", HOME_CARE, SKARHOLMEN_BISTAND}


async def test_without_an_address_rol_alone_decides_as_before(db: Database) -> None:
    pipeline = Pipeline(db, directory=_directory())
    mid = await pipeline.run(_message(6, None, parties=HOME), "RES-6")
    assert set(await _deliveries(db, mid)) == {"SE2321000016-V010", HOME_CARE}


async def test_a_discharge_reaches_the_residence_and_a_municipal_override_applies(
    db: Database,
) -> None:
    pipeline = Pipeline(db, directory=_directory())
    msg = _message(
        7, Address(municipality="0126"), parties=HOME, event=LusEvent.UTSKRIVNINGSMEDDELANDE
    )
    got = await _deliveries(db, await pipeline.run(msg, "RES-7"))
    assert not got[HUDDINGE_BISTAND].for_information


# --- who sees the address ---------------------------------------------------------------


async def _seen_by(db: Database, hsa_id: str, delivery_id: str) -> dict[str, Any]:
    async with db.read() as conn:
        notice = await inbox.get_notice(conn, hsa_id, delivery_id)
    assert notice is not None
    return next(
        e["resource"] for e in notice.bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )


@pytest.mark.parametrize("protected", [False, True], ids=["open", "protected"])
async def test_the_address_reaches_the_roles_that_need_it_and_never_a_protected_one(
    db: Database, protected: bool
) -> None:
    pipeline = Pipeline(db, directory=_directory())
    named = [*HOME, CareParty("sabo", SABO, "SÄBO")]
    address = Address((STREET,), "Skärholmen", "12743")
    msg = _message(
        8, address, parties=named, protected=protected, event=LusEvent.UTSKRIVNINGSMEDDELANDE
    )
    got = await _deliveries(db, await pipeline.run(msg, "RES-8"))
    assert got[SKARHOLMEN_BISTAND].state == "delivered"  # routed by the address even so
    for hsa_id in (HOME_CARE, SKARHOLMEN_BISTAND, "SE2321000016-V010"):
        patient = await _seen_by(db, hsa_id, got[hsa_id].id)
        assert ("address" in patient) is not protected, hsa_id
        if not protected:
            assert patient["address"][0]["line"] == [STREET]
    assert "address" not in await _seen_by(db, SABO, got[SABO].id)  # [content.address]
    assert (got[SABO].withheld or "").split(",") == ["address"]


@pytest.mark.parametrize("protected", [False, True], ids=["open", "protected"])
async def test_a_closed_units_on_call_is_sent_what_the_unit_would_be(
    db: Database, office_hours: RunningClock, protected: bool
) -> None:
    """At night the notice goes to the on-call unit at once (decision 0019). It acts for the
    closed unit and is sent what that unit would be: a protected identity's address never."""
    office_hours.start = datetime(2026, 11, 23, 22, 0, tzinfo=UTC)  # Monday 23:00 in Stockholm
    pipeline = Pipeline(db, directory=_directory())
    msg = _message(10, Address((STREET,), "Skärholmen", "12743"), parties=HOME, protected=protected)
    got = await _deliveries(db, await pipeline.run(msg, "RES-10"))
    on_call = {h: d for h, d in got.items() if d.escalated_from is not None}
    assert on_call, "a closed unit's on-call unit was told"
    for hsa_id, delivery in on_call.items():
        patient = await _seen_by(db, hsa_id, delivery.id)
        assert ("address" in patient) is not protected, hsa_id
        late = next(d for d in got.values() if d.id == delivery.escalated_from)
        assert delivery.withheld == late.withheld


async def test_the_address_is_stored_only_encrypted(db: Database) -> None:
    """Every value of every table (messages, deliveries, outbox: what goes on Kafka,
    ledger, audit …) after routing and follow-up: the street is nowhere in clear."""
    pipeline = Pipeline(db, directory=_directory())
    msg = _message(9, Address((STREET,), "Skärholmen", "12743"), parties=HOME)
    mid = await pipeline.run(msg, "RES-9")
    await pipeline.follow_up()
    assert (await _deliveries(db, mid))[SKARHOLMEN_BISTAND].state == "delivered"
    found = []
    tables = set()
    async with db.read() as conn:
        for table in metadata.sorted_tables:
            tables.add(table.name)
            # plain SQL: the table objects' column types would decrypt what they read
            result = await conn.execute(text(f'SELECT * FROM "{table.name}"'))
            for row in result.all():
                for column, value in zip(result.keys(), row, strict=True):
                    shown = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    if "Qvarnbacksgr" in shown or "Qvarnbacksgr" in json.dumps(shown):
                        found.append(f"{table.name}.{column}")
    assert found == []
    assert tables >= {"messages", "deliveries", "outbox", "audit_log"}
    async with db.read() as conn:  # and it is there, for who may read it
        stored = (await conn.execute(select(messages.c.canonical))).scalars().all()
    assert any(STREET in json.dumps(c, ensure_ascii=False) for c in stored)


def test_outbound_hl7v2_carries_the_address_only_where_the_bundle_does() -> None:
    from adapters.hl7v2.render import render
    from tests.test_hl7_outbound import strict_problems

    address = Address(("Sjövägen 4", "lgh 1102"), "Huddinge", "14131", "0126", "SE")
    bundle = to_bundle(dataclasses.replace(canonical(), address=address))
    er7 = render(bundle, "dedup-1", HOME_CARE)
    pid = next(s for s in er7.split("\r") if s.startswith("PID|")).split("|")
    assert pid[11] == "Sjövägen 4^lgh 1102^Huddinge^^14131^SWE^L^^0126"
    assert strict_problems(er7) == []
    withheld = render(withhold(bundle, ["address"]), "dedup-1", HOME_CARE)
    pid = next(s for s in withheld.split("\r") if s.startswith("PID|")).split("|")
    assert len(pid) <= 11 or pid[11] == ""


_FULL = (MAPPINGS_DIR / "takecare" / "golden" / "adt_a01_full.hl7").read_bytes()
_part = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
).map(str.strip)


@given(
    street=_part,
    city=_part,
    postcode=st.from_regex(r"\d{3} ?\d{2}", fullmatch=True),
    code=st.from_regex(r"\d{4}", fullmatch=True) | st.sampled_from(["", "01", "AB12"]),
    legal_second=st.booleans(),
)
def test_any_pid11_is_read_as_sent(
    street: str, city: str, postcode: str, code: str, legal_second: bool
) -> None:
    """Any texts (HL7-escaped on the wire), either order of repetitions: the legal one wins."""
    from adapters.takecare.ack import escape

    legal = f"{escape(street)}^^{escape(city)}^^{postcode}^SE^L^^{code}"
    other = "Box 1^^Annanstans^^99999^SE^M"
    pid11 = f"{other}~{legal}" if legal_second else f"{legal}~{other}"
    raw = _FULL.replace(b"Storgatan 1^^Stockholm^^11122^SE", pid11.encode("utf-8"))
    got = read_bundle(to_bundle(parse(raw).canonical)).address
    assert got is not None
    assert got.line == ((street,) if street else ())
    assert got.city == city
    assert got.postal_code == postcode.replace(" ", "")
    assert got.municipality == (code if len(code) == 4 and code.isdigit() else "")


async def test_a_referral_goes_to_its_provider_not_by_residence(db: Database) -> None:
    from gateway.model.bundle import Referral

    pipeline = Pipeline(db, directory=_directory())
    rehab = CareParty("rehab", "SE2321000016-R040", "Rehab")
    msg = dataclasses.replace(
        _message(10, Address(postal_code="12743"), parties=[rehab]),
        event=LusEvent.PLANERINGSUNDERLAG,
        referral=Referral(rehab, "rehab"),
    )
    got = await _deliveries(db, await pipeline.run(msg, "RES-10"))
    assert SKARHOLMEN_BISTAND not in got and "SE2321000016-R040" in got
