"""TakeCare HL7 v2 mapping data (TOML code maps and golden cases); no code."""
