"""Outbound HL7 v2: the rendering of the canonical Bundle, with golden cases."""
