"""The canonical form: LUS events, Swedish identifiers, FHIR R4 message Bundles. No I/O."""
