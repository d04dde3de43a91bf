"""Create the topics of ``stream.topics.Topics`` on the broker, before any worker starts."""

from __future__ import annotations

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from stream.kafka.security import client_options
from stream.topics import Topics
from terradapt.settings import KafkaConfig


def ensure_topics(config: KafkaConfig, topics: Topics) -> list[str]:
    """Create missing topics with the configured partition count before any worker starts; return created names.

    Created up front because topics auto-created by clients can get partition counts that mismatch the faust
    changelog topics (``PartitionsMismatch``).
    """
    admin = KafkaAdminClient(**client_options(config), client_id="terradapt-admin")
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
