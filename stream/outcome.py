"""What a pipeline call returns, and the typed errors of the flow itself (not of one stage's input).

``Outcome`` carries the records to publish (each on a logical topic, keyed by region) and the region's new state:
the one shape every runner moves, whichever message kind produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeVar

from stream.topics import TopicName
from terradapt.errors import InvalidPayloadError, TerradaptError
from terradapt.records import DeadLetter, Record, Stage

R = TypeVar("R", bound=Record)


class KeyMismatchError(TerradaptError, ValueError):
    """A message's Kafka key is not its region: per-region state is partitioned by key, so it is refused."""

    reason = "key_mismatch"

    def __init__(self, key: str | None, region: str) -> None:
        super().__init__(f"message key {key!r} is not its region {region!r}: publish keyed by region")


class PredictorUnavailableError(TerradaptError, ConnectionError):
    """The predictor failed with transient errors on every try."""

    reason = "predictor_unavailable"


@dataclass(frozen=True)
class Outgoing:
    """A record to publish on a logical topic, keyed by region."""

    topic: TopicName
    key: str
    record: Record


@dataclass(frozen=True)
class Outcome:
    """What one message produced: records to publish, and the region's new state (None: leave it as it is)."""

    messages: tuple[Outgoing, ...] = ()
    state: bytes | None = None

    def records(self, topic: TopicName) -> list[Record]:
        """The records of one topic."""
        return [m.record for m in self.messages if m.topic == topic]

    def of(self, kind: type[R]) -> list[R]:
        """The records of one type (``outcome.of(ModelVersion)``)."""
        return [m.record for m in self.messages if isinstance(m.record, kind)]


def dead_letter(
    topic: str, stage: Stage, error: Exception | str, payload: bytes, key: str | None, reason: str | None = None
) -> DeadLetter:
    """The one way a dead letter record is made: the original payload, the reason, the error's text.

    The reason is the typed error's own (``TerradaptError.reason``) unless given; any other exception is an
    ``internal_error`` and keeps its repr.
    """
    if reason is None:
        reason = error.reason if isinstance(error, TerradaptError) else "internal_error"
    text = error if isinstance(error, str) else (str(error) if isinstance(error, TerradaptError) else repr(error))
    return DeadLetter(
        topic=topic, reason=reason, error=text, payload=payload.decode("utf-8", errors="replace"), key=key, stage=stage
    )


def json_object(data: bytes) -> dict[str, object]:
    """A stored JSON object (a state), refused when it is anything else."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise InvalidPayloadError("stored label state is not a JSON object")
    return value


def compact_json(value: object) -> bytes:
    """JSON without spaces (stored states)."""
    return json.dumps(value, separators=(",", ":")).encode()
