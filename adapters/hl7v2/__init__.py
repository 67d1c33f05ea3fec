"""HL7 v2 over MLLP to a recipient's own system."""
