"""FHIR messaging: deliver the canonical Bundle to a recipient's FHIR server."""
