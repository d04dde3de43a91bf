"""Hypothesis strategies for message payloads: arbitrary JSON, and valid JSON documents with a few fields broken.

A broken document is the most useful fuzz input for a schema: it gets past the JSON parser and the first checks,
and then one field (or a nested one) holds a value of the wrong type or range, or is missing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

#: scalars that schemas trip on: empty and huge strings, path-like and control characters, extreme numbers
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30]),
    st.floats(),  # NaN and infinities included
    st.text(max_size=30),
    st.sampled_from(["", "../../etc/passwd", "D033", "dubai-3", "a" * 300, "\x00", "1e309", "2024-13-45T99:00:00Z"]),
)

#: any JSON value, a few levels deep
json_values = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def broken(
    draw: st.DrawFn, document: dict[str, Any], max_changes: int = 3, max_depth: int | None = None
) -> dict[str, Any]:
    """``document`` with 1 to ``max_changes`` of its fields (down to ``max_depth``, any depth by default) replaced
    by any JSON value, or removed."""
    out = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, max_changes))):
        paths = [p for p in _paths(out) if p and (max_depth is None or len(p) <= max_depth)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = out
        for part in path[:-1]:
            parent = parent[part]
        if draw(st.integers(0, 3)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return out


def payloads(document: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Message payloads around a valid ``document``: itself, broken copies, any JSON, any bytes, deep nesting."""
    return st.one_of(
        st.just(json.dumps(document).encode()),
        broken(document).map(lambda d: json.dumps(d).encode()),
        broken(document).map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),  # nesting past every parser's stack
        st.just(json.dumps(document).encode()).map(lambda b: b[: len(b) // 2]),  # cut in the middle
    )
