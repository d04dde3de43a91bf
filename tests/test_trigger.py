"""The trigger: covariate evidence on the source model, any alarm on an adapted one; cooldown, budget, state."""

from adapters.trigger import Trigger, TriggerConfig


def _seen(trigger, region, n):
    for _ in range(n):
        trigger.observe(region)


def test_label_shift_alarm_adapts_only_a_region_on_an_adapted_version():
    t = Trigger(TriggerConfig(min_tiles=4))
    _seen(t, "D029", 10)
    source = t.decide("D029", drifted=True, covariate=False, buffered=8)
    assert not source.adapt and "label shift" in source.reason
    adapted = t.decide("D029", drifted=True, covariate=False, buffered=8, adapted=True)
    assert adapted.adapt and adapted.reason == "drift on an adapted version"
    assert not t.decide("D033", drifted=False, covariate=False, buffered=16).adapt


def test_waits_for_tiles_then_cooldown_then_budget():
    t = Trigger(TriggerConfig(min_tiles=4, cooldown_tiles=5, max_versions=2))
    _seen(t, "D013", 3)
    assert "waiting" in t.decide("D013", drifted=True, covariate=True, buffered=3).reason
    assert t.decide("D013", drifted=True, covariate=True, buffered=4).adapt
    _seen(t, "D013", 4)
    assert t.decide("D013", drifted=True, covariate=True, buffered=16).reason == "cooldown"
    _seen(t, "D013", 1)
    assert t.decide("D013", drifted=True, covariate=True, buffered=16).adapt
    _seen(t, "D013", 10)
    assert "budget" in t.decide("D013", drifted=True, covariate=True, buffered=16).reason


def test_state_round_trip_keeps_the_decisions():
    t = Trigger(TriggerConfig(min_tiles=1, cooldown_tiles=3))
    _seen(t, "D013", 2)
    assert t.decide("D013", drifted=True, covariate=True, buffered=2).adapt
    _seen(t, "D013", 1)
    restored = Trigger(TriggerConfig(min_tiles=1, cooldown_tiles=3))
    restored.load_state_dict(t.state_dict())
    for trig in (t, restored):
        assert trig.decide("D013", drifted=True, covariate=True, buffered=2).reason == "cooldown"
