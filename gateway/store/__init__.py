"""The system of record: tables, the database handle, migrations."""
