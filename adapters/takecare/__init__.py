"""TakeCare (Region Stockholm's journal system): HL7 v2 over MLLP, inbound.

``hl7in.parse`` turns one message into an ``Inbound`` (header + canonical message) or an
``Hl7Rejection``; ``ack.build_ack`` answers it; ``mllp`` carries both over TCP.
"""

from adapters.takecare.ack import build_ack, parse_ack
from adapters.takecare.hl7in import Hl7Rejection, Inbound, MshHeader, parse

__all__ = ["Hl7Rejection", "Inbound", "MshHeader", "build_ack", "parse", "parse_ack"]
