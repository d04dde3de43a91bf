"""Topic layout: one topic per record type, keyed by region so one partition sees a region's records in order."""

from __future__ import annotations

from dataclasses import dataclass, fields

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from terradapt.settings import KafkaConfig


@dataclass(frozen=True)
class Topics:
    """Names of the topics under a prefix (``terradapt.`` by default)."""

    acquisitions: str
    predictions: str
    features: str
    drift_events: str
    adaptation_jobs: str
    model_versions: str
    rollouts: str
    labels: str
    deadletter: str

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        """Every topic named ``<prefix><record-name>``."""
        return cls(**{f.name: prefix + f.name.replace("_", "-") for f in fields(cls)})

    def all(self) -> list[str]:
        """Every topic name."""
        return [getattr(self, f.name) for f in fields(self)]


def ensure_topics(config: KafkaConfig, topics: Topics) -> list[str]:
    """Create missing topics with the configured partition count before any worker starts; return created names.

    Created up front because topics auto-created by clients can get partition counts that mismatch the faust
    changelog topics (``PartitionsMismatch``).
    """
    admin = KafkaAdminClient(bootstrap_servers=config.bootstrap, client_id="terradapt-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics.all() if t not in existing]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, num_partitions=config.partitions, replication_factor=1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
