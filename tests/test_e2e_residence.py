"""Where the patient lives decides the needs assessment, on real parts (decision 0016).

TakeCare admissions over MLLP, a real broker, the gateway's processes, SQLite and
PostgreSQL; read back through the ledger and the inbox API. One admission per rule: the
postcode finds the Stockholm district's unit without ROL; a unit named in ROL and found by
residence is told once; a municipality without a unit is a visible failure; a protected
identity's address reaches nobody, though it still routes.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.demo import admission
from tests.support import GatewayProcess, now_sthlm, personnummer, wait_for
from tests.test_e2e_path import ledger, message_id_of, msa, send

pytestmark = pytest.mark.slow

BISTAND = "SE2120001637-B020"  # Biståndsenheten Skärholmen, demo directory
ROL_BISTAND = "ROL|3|AD|BISTAND|SE2120001637-B020^Biståndsenheten Skärholmen"


def _admission(
    control_id: str, n: int, pid11: str, *, rol_bistand: bool = False, protected: bool = False
) -> bytes:
    raw = admission(control_id, now_sthlm(), pnr=personnummer(900 + n), family=f"Boendesson{n}")
    text = raw.decode("utf-8").replace("Storgatan 1^^Stockholm^^11122^SWE", pid11)
    if not rol_bistand:
        text = text.replace(ROL_BISTAND + "\r", "")
    if protected:
        text = text.replace("^SE2321000016-V010\r", "^SE2321000016-V010|||||||||Y\r")
    return text.encode("utf-8")


def _deliveries(gw: GatewayProcess, control_id: str) -> dict[str, dict[str, Any]]:
    found = ledger(gw, message_id_of(gw, control_id))
    return {d["recipient"]["hsa_id"]: d for d in found["deliveries"]}


def _settled(gw: GatewayProcess, control_id: str, recipient: str) -> dict[str, dict[str, Any]]:
    return wait_for(
        lambda: (
            got
            if (got := _deliveries(gw, control_id)).get(recipient, {}).get("state")
            in ("delivered", "failed")
            else None
        ),
        what=f"the delivery to {recipient}",
    )


def _opened_patient(gw: GatewayProcess, delivery_id: str) -> dict[str, Any]:
    opened = httpx.get(f"{gw.base_url}/api/v1/inbox/{delivery_id}", headers=gw.token(BISTAND))
    assert opened.status_code == 200, opened.text
    return next(
        e["resource"]
        for e in opened.json()["bundle"]["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )


def test_the_residence_decides_the_needs_assessment_over_the_whole_path(
    gateway: GatewayProcess,
) -> None:
    gw = gateway
    cases = {
        "RES-POST": _admission("RES-POST", 1, "Bredängsvägen 210^^Skärholmen^^127 32^SE"),
        "RES-BOTH": _admission(
            "RES-BOTH", 2, "Bredängsvägen 212^^Skärholmen^^12732^SE", rol_bistand=True
        ),
        "RES-NONE": _admission("RES-NONE", 3, "Kyrkvägen 3^^Lidingö^^18131^SE^L^^0186"),
        "RES-PROT": _admission(
            "RES-PROT", 4, "Lönngatan 9^^Skärholmen^^12743^SE^L^^0180", protected=True
        ),
    }
    for control_id, raw in cases.items():
        assert msa(send(gw, raw))[1] == "AA", control_id

    # The postcode alone finds Skärholmen's needs assessment; the address reaches it.
    post = _settled(gw, "RES-POST", BISTAND)
    assert post[BISTAND]["state"] == "delivered" and post[BISTAND]["role"] == "bistand"
    assert not post[BISTAND]["for_information"]
    patient = _opened_patient(gw, post[BISTAND]["delivery_id"])
    assert patient["address"][0]["line"] == ["Bredängsvägen 210"]
    assert patient["address"][0]["postalCode"] == "12732"

    # Named in ROL and found by residence: one delivery.
    both = _settled(gw, "RES-BOTH", BISTAND)
    assert [h for h, d in both.items() if d["role"] == "bistand"] == [BISTAND]

    # Lidingö (0186) has no needs assessment in the directory: a visible failure.
    none = _settled(gw, "RES-NONE", "bistand@0186")
    assert none["bistand@0186"]["state"] == "failed"
    assert BISTAND not in none

    # A protected identity: routed by the address, which is sent to nobody.
    prot = _settled(gw, "RES-PROT", BISTAND)
    assert prot[BISTAND]["state"] == "delivered"
    assert all(d["withheld"] == ["address"] for d in prot.values() if d["state"] != "failed")
    assert "address" not in _opened_patient(gw, prot[BISTAND]["delivery_id"])
