#!/bin/sh
# Create Brygga's four topics on an Apache Kafka cluster, if they do not exist yet.
# The test suite runs this very script against its Apache Kafka (tests/services/kafka.py).
#
#   deploy/kafka-topics.sh kafka1.example.org:9093
#
# Environment (defaults in brackets):
#   KAFKA_TOPICS        path of kafka-topics.sh [kafka-topics.sh; /opt/kafka/bin/kafka-topics.sh in apache/kafka]
#   KAFKA_COMMAND_CONFIG  client properties file for a TLS and/or SASL listener (passed as
#                       --command-config), e.g. security.protocol=SASL_SSL,
#                       sasl.mechanism=SCRAM-SHA-512, sasl.jaas.config=…, ssl.truststore.*
#   PARTITIONS          partitions per topic [12]; the upper bound of consumers per stage.
#                       Choose before go-live: changing it moves patients to other partitions.
#   REPLICATION_FACTOR  [3]; 1 for a single-broker cluster
#   MIN_INSYNC          min.insync.replicas [2, or 1 when REPLICATION_FACTOR is 1]
#   RETENTION_MS        retention of events, deliveries and receipts [604800000 = 7 days]
#   DEADLETTER_RETENTION_MS  retention of brygga.deadletter [2592000000 = 30 days]
#   TOPIC_PREFIX        prepended to every topic name [none]; the gateway's BRYGGA_KAFKA_TOPIC_PREFIX
#
# Retention only bounds how far back a subscriber can re-read: the database is the system of
# record, and the gateway's reconciler republishes unfinished work by itself.
set -eu

BOOTSTRAP="${1:-${KAFKA_BOOTSTRAP:-localhost:9092}}"
KT="${KAFKA_TOPICS:-kafka-topics.sh}"
PARTITIONS="${PARTITIONS:-12}"
RF="${REPLICATION_FACTOR:-3}"
if [ "$RF" -gt 1 ]; then MIN_ISR_DEFAULT=2; else MIN_ISR_DEFAULT=1; fi
MIN_ISR="${MIN_INSYNC:-$MIN_ISR_DEFAULT}"
RETENTION_MS="${RETENTION_MS:-604800000}"
DEADLETTER_RETENTION_MS="${DEADLETTER_RETENTION_MS:-2592000000}"
PREFIX="${TOPIC_PREFIX:-}"

kt() {
    if [ -n "${KAFKA_COMMAND_CONFIG:-}" ]; then
        "$KT" --bootstrap-server "$BOOTSTRAP" --command-config "$KAFKA_COMMAND_CONFIG" "$@"
    else
        "$KT" --bootstrap-server "$BOOTSTRAP" "$@"
    fi
}

create() {
    kt --create --if-not-exists \
        --topic "$PREFIX$1" --partitions "$PARTITIONS" --replication-factor "$RF" \
        --config cleanup.policy=delete \
        --config retention.ms="$2" \
        --config min.insync.replicas="$MIN_ISR"
}

create brygga.events "$RETENTION_MS"
create brygga.deliveries "$RETENTION_MS"
create brygga.receipts "$RETENTION_MS"
create brygga.deadletter "$DEADLETTER_RETENTION_MS"

kt --describe --topic "${PREFIX}brygga\..*"
