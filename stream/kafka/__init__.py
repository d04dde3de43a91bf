"""The Kafka runner: topics, the ingest producer, the faust stream worker and the adaptation worker."""
