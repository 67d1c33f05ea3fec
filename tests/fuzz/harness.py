"""Fuzz targets shared by the atheris runs and the regression-corpus replay in pytest.

Each target takes one input and returns normally when the code under test behaved: the
HL7 v2 entry point parsed and mapped it, or refused it with its own typed rejection (never
an internal error, never another exception); the MLLP framer, fed the bytes in chunks, found
the same frames as when fed at once and never held more than its limits.
"""

from __future__ import annotations

import random

from adapters.takecare.hl7in import Hl7Rejection, parse
from adapters.takecare.mllp import FrameBudget, Framer, FrameTooLarge
from gateway.model.bundle import bundle_json, to_bundle

INTERNAL_ERROR = 207  # HL7 table 0357: what parse answers when a bug escaped the mapping


class FuzzFailure(AssertionError):
    """An input broke an invariant (the fuzzer reports it as a crash)."""


def hl7_one(data: bytes) -> None:
    """Parse + map + render as the accept path does; only a typed rejection may escape."""
    try:
        inbound = parse(data)
    except Hl7Rejection as rejection:
        if rejection.hl7_error_code == INTERNAL_ERROR:
            raise FuzzFailure(f"internal error at {rejection.location}") from None
        if rejection.ack_code not in ("AE", "AR"):
            raise FuzzFailure(f"ack code {rejection.ack_code}") from None
        return
    bundle_json(to_bundle(inbound.canonical, "fuzz"))


def _frames_at_once(data: bytes, limit: int) -> list[bytes]:
    """The reference: the framer fed everything at once, restarting after a refusal."""
    framer, out = Framer(limit), []
    try:
        out += framer.feed(data)
    except FrameTooLarge as exc:
        out += exc.frames
        return [*out, b"<too large>"]
    return out


def mllp_one(data: bytes) -> None:
    """Feed ``data`` in chunks chosen by its first bytes; compare with feeding it at once."""
    if len(data) < 2:
        return
    limit = 1 + data[0] * 4  # small limits so inputs reach them
    rng = random.Random(data[1])
    payload = data[2:]
    budget = FrameBudget(limit * 4 if data[1] & 1 else limit // 2 + 1)  # odd: never reached
    framer, out, pos = Framer(limit, budget), list[bytes](), 0
    refused = False
    while pos < len(payload) and not refused:
        step = rng.randint(1, 64)
        try:
            out += framer.feed(payload[pos : pos + step])
        except FrameTooLarge as exc:
            out += [*exc.frames, b"<too large>"]
            refused = True
        pos += step
        if framer.pending > limit + 1 or budget.held != framer.pending:
            raise FuzzFailure(f"holds {framer.pending} bytes, budget {budget.held}")
    framer.close()
    if budget.held:
        raise FuzzFailure(f"budget still holds {budget.held} bytes after close")
    if not refused and out != _frames_at_once(payload, limit):
        raise FuzzFailure("chunked feeding found other frames than feeding at once")
    if refused:
        # A partial frame can pass the limit before a restart byte would have dropped it,
        # so the refusal may come earlier than at once; the frames before it may not differ.
        found = out[:-1]
        if found != _frames_at_once(payload, limit)[: len(found)]:
            raise FuzzFailure("chunked feeding found other frames before the refusal")
