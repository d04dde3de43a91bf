"""``Pipeline.process_many``: acquisitions predicted together decide exactly as when processed one by one.

What the faust acquisitions agent runs on the messages waiting (``stream.batch_max_tiles``). A region's later items
must see the state its earlier items leave; bad items dead-letter alone; a predictor failure dead-letters only the
region whose call failed.
"""

from __future__ import annotations

import json
import math
from typing import Any

from stream.outcome import Outcome
from terradapt.records import DeadLetter
from tests.fakes.world import Rig, World, make_rig, publish, settings

REL = ABS = 1e-5  # batched forwards sum in another order than single ones (float32)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (floats to ``REL`` or ``ABS``); empty when they agree."""
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return [] if numbers and math.isclose(a, b, rel_tol=REL, abs_tol=ABS) else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


CLOCK = ("latency_s", "at", "created", "detected_at")  # what depends on when, not on what


def _unclocked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unclocked(v) for k, v in value.items() if k not in CLOCK}
    if isinstance(value, list):
        return [_unclocked(v) for v in value]
    return value


def _view(outcome: Outcome) -> list[tuple[str, Any]]:
    """An outcome's records without what depends on the clock."""
    return [(m.topic, _unclocked(json.loads(m.record.to_json()))) for m in outcome.messages]


def _stream(rig: Rig, world: World) -> list[tuple[bytes, str | None]]:
    """Shifted D013 tiles (they drift and issue a job) interleaved with D033 tiles, a corrupt and a mis-keyed one."""
    items: list[tuple[bytes, str | None]] = []
    for i in range(20):
        items.append((publish(rig.objects, "D013", i, world.shifted[i].image), "D013"))
        if i % 3 == 0:
            items.append((publish(rig.objects, "D033", i, world.source[i].image), "D033"))
    items.insert(5, (b"{not json", "D013"))
    items.insert(9, (publish(rig.objects, "D044", 99, world.source[20].image), "D013"))  # key says another region
    return items


def _one_by_one(rig: Rig, items: list[tuple[bytes, str | None]]) -> tuple[list[Outcome], dict[str | None, bytes]]:
    states: dict[str | None, bytes] = {}
    outcomes = []
    for payload, key in items:
        out = rig.pipeline.process(payload, key, states.get(key))
        if out.state is not None:
            states[key] = out.state
        outcomes.append(out)
    return outcomes, states


def _batched(
    rig: Rig, items: list[tuple[bytes, str | None]], size: int
) -> tuple[list[Outcome], dict[str | None, bytes]]:
    """As the agent does: each batch gets the states stored before it, the states its outcomes return are stored."""
    states: dict[str | None, bytes] = {}
    outcomes: list[Outcome] = []
    for s in range(0, len(items), size):
        chunk = items[s : s + size]
        outs = rig.pipeline.process_many([(p, k, states.get(k)) for p, k in chunk])
        for (_, key), out in zip(chunk, outs, strict=True):
            if out.state is not None:
                states[key] = out.state
        outcomes += outs
    return outcomes, states


def test_batches_decide_as_one_by_one(world, tmp_path):
    cfg = settings(trigger={"min_tiles": 4})
    one = make_rig(world, tmp_path / "one", cfg)
    items = _stream(one, world)
    expected, expected_states = _one_by_one(one, items)
    assert any(o.records("adaptation_jobs") for o in expected), "the stream issued no job: the test lost its point"
    assert sum(1 for o in expected if o.records("deadletter")) == 2
    for size in (4, 7, len(items)):
        rig = make_rig(world, tmp_path / f"batch{size}", cfg)
        got, states = _batched(rig, _stream(rig, world), size)
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert not _diff(_view(a), _view(b)), (size, i, _diff(_view(a), _view(b))[:5])
        assert states.keys() == expected_states.keys()
        for key, state in states.items():
            assert not _diff(json.loads(state), json.loads(expected_states[key])), (size, key)


class FailingFor:
    """Predicts, except for one region, whose calls fail as an unreachable server does."""

    def __init__(self, inner: Any, region: str) -> None:
        self.inner, self.region = inner, region

    def predict(self, region: str, images: Any, version: int | None = None) -> Any:
        if region == self.region:
            raise ConnectionError("torchserve unreachable")
        return self.inner.predict(region, images, version)


def test_a_failed_predictor_call_dead_letters_only_its_region(world, tmp_path):
    rig = make_rig(world, tmp_path / "models", settings(stream={"predict_retries": 1}))
    rig.pipeline.sleep = lambda _: None
    rig.pipeline.predictor = FailingFor(rig.pipeline.predictor, "D013")
    items = [
        (publish(rig.objects, "D013", 0, world.shifted[0].image), "D013", None),
        (publish(rig.objects, "D033", 0, world.source[0].image), "D033", None),
        (publish(rig.objects, "D013", 1, world.shifted[1].image), "D013", None),
    ]
    a, b, c = rig.pipeline.process_many(items)
    assert [r.reason for r in a.of(DeadLetter) + c.of(DeadLetter)] == ["predictor_unavailable"] * 2
    assert a.state is None and c.state is None
    assert [m.topic for m in b.messages] == ["predictions", "features"] and b.state is not None
