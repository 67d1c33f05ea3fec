"""Envelope encryption of patient data, in the database and on Kafka (decision 0007).

- :mod:`~gateway.crypto.envelope`: the ciphertext format (AES-256-GCM, versioned, bound to
  where the value lives);
- :mod:`~gateway.crypto.kek`: key-encryption keys (a file, ``BRYGGA_KEK``, or a KMS plugged in);
- :mod:`~gateway.crypto.keyring`: the data keys of one process, rotation without restart;
- :mod:`~gateway.crypto.columns`: encrypted column types for the tables;
- :mod:`~gateway.crypto.maintenance` and :mod:`~gateway.crypto.cli`: ``brygga keys``.
"""
