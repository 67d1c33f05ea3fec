"""Kafka: topics, event envelopes, the outbox relay, the reconciler, the embedded broker."""
