"""The trigger: covariate evidence on the source model, any alarm on an adapted one; cooldown, budget, state."""

from adapters.trigger import Trigger, TriggerConfig, TriggerState


def _seen(trigger, state, n):
    for _ in range(n):
        trigger.observe(state)


def test_label_shift_alarm_adapts_only_a_region_on_an_adapted_version():
    t = Trigger(TriggerConfig(min_tiles=4))
    state = TriggerState()
    _seen(t, state, 10)
    source = t.decide(state, drifted=True, covariate=False, buffered=8)
    assert not source.adapt and "label shift" in source.reason
    adapted = t.decide(state, drifted=True, covariate=False, buffered=8, adapted=True)
    assert adapted.adapt and adapted.reason == "drift on an adapted version"
    assert not t.decide(TriggerState(), drifted=False, covariate=False, buffered=16).adapt


def test_waits_for_tiles_then_cooldown_then_budget():
    t = Trigger(TriggerConfig(min_tiles=4, cooldown_tiles=5, max_versions=2))
    state = TriggerState()
    _seen(t, state, 3)
    assert "waiting" in t.decide(state, drifted=True, covariate=True, buffered=3).reason
    assert t.decide(state, drifted=True, covariate=True, buffered=4).adapt
    _seen(t, state, 4)
    assert t.decide(state, drifted=True, covariate=True, buffered=16).reason == "cooldown"
    _seen(t, state, 1)
    assert t.decide(state, drifted=True, covariate=True, buffered=16).adapt
    _seen(t, state, 10)
    assert "budget" in t.decide(state, drifted=True, covariate=True, buffered=16).reason


def test_state_round_trip_keeps_the_decisions():
    t = Trigger(TriggerConfig(min_tiles=1, cooldown_tiles=3))
    state = TriggerState()
    _seen(t, state, 2)
    assert t.decide(state, drifted=True, covariate=True, buffered=2).adapt
    _seen(t, state, 1)
    restored = TriggerState.from_dict(state.to_dict())
    for s in (state, restored):
        assert t.decide(s, drifted=True, covariate=True, buffered=2).reason == "cooldown"


def test_regions_have_independent_counters():
    t = Trigger(TriggerConfig(min_tiles=1, cooldown_tiles=10))
    a, b = TriggerState(), TriggerState()
    assert t.decide(a, drifted=True, covariate=True, buffered=1).adapt
    assert t.decide(b, drifted=True, covariate=True, buffered=1).adapt  # a's cooldown is not b's
    assert t.decide(a, drifted=True, covariate=True, buffered=1).reason == "cooldown"
