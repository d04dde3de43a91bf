"""False-discovery control across regions: per-region evidence -> alarms, Benjamini-Hochberg per look.

Each region's monitor keeps its own expected run time, but with hundreds of regions some of them will cross
their threshold by chance every day. When alarms are decided jointly over the regions seen at one *look*
(a batch of acquisitions, a day), Benjamini-Hochberg bounds the expected share of false alarms among the alarms
raised at that look; spending the level over looks bounds the sum of those shares over the whole run.

Guarantee (stated precisely in ``CrossRegionFDR``): it holds for valid p-values, i.e. P(p <= a) <= a for a
region without drift. ``evidence_pvalue`` gives one for any calibrated detector (1/ERT at an alarm, 1 otherwise);
``WindowedDetector.p_value`` gives a finer one from its fitted null tail (approximate: the tail is a
moment-matched law, see ``monitoring.detectors.windowed``); the dashboard runs one review per state it
writes (``monitoring.dashboard.state``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from terradapt.settings import StrictModel


def evidence_pvalue(score: float, threshold: float, ert: int) -> float:
    """A valid (conservative) p-value from a detector's decision at one tile.

    A detector calibrated to ``ert`` crosses its threshold on a source-like tile with probability about
    ``1 / ert``, so ``1/ert`` if ``score > threshold`` else ``1.0`` is super-uniform under the null. Coarse: it
    only lets BH pick among regions that already alarm, at a stricter level.
    """
    return 1.0 / ert if score > threshold else 1.0


def benjamini_hochberg(
    pvalues: Mapping[str, float], q: float, dependence: Literal["prds", "arbitrary"] = "prds"
) -> frozenset[str]:
    """Keys rejected by the Benjamini-Hochberg step-up procedure at level ``q``.

    Args:
        pvalues: region -> p-value of its no-drift hypothesis.
        q: target false-discovery rate.
        dependence: "prds" (independent or positively dependent p-values: BH) or "arbitrary"
            (Benjamini-Yekutieli: level divided by the harmonic number of the number of regions).

    Returns:
        The regions declared drifting.

    Raises:
        ValueError: when q is outside (0, 1) or a p-value outside [0, 1].

    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q} must be in (0, 1)")
    bad = {k: p for k, p in pvalues.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ValueError(f"p-values must be in [0, 1], got {bad}")
    m = len(pvalues)
    if m == 0:
        return frozenset()
    level = q if dependence == "prds" else q / sum(1.0 / i for i in range(1, m + 1))
    ranked = sorted(pvalues.items(), key=lambda kv: kv[1])
    last = max((i for i, (_, p) in enumerate(ranked, start=1) if p <= level * i / m), default=0)
    return frozenset(k for k, _ in ranked[:last])


class FDRConfig(StrictModel):
    """Config of cross-region FDR control."""

    q: float = Field(default=0.05, gt=0.0, lt=1.0, description="false-discovery rate (per look, or summed)")
    spending: Literal["none", "harmonic"] = Field(
        default="none", description="'none': level q at every look; 'harmonic': q / (t (t + 1)) at look t"
    )
    dependence: Literal["prds", "arbitrary"] = "prds"


class CrossRegionFDR:
    """Turns the p-values of the regions seen at one look into alarms.

    Guarantee. Let m regions be tested at a look, m0 of them without drift, whose p-values are valid
    (P(p <= a) <= a) and independent of each other and of the drifting regions' p-values (or positively
    dependent, PRDS). Then with ``spending="none"`` the expected share of false alarms among that look's alarms,
    E[V / max(R, 1)], is at most q * m0 / m <= q at *every* look; with ``dependence="arbitrary"`` the same holds
    without any dependence assumption (Benjamini-Yekutieli). With ``spending="harmonic"`` look t runs at level
    q / (t (t + 1)), so the FDRs of all looks *sum* to at most q over an unbounded run (alpha spending over time):
    with no drifting region at all, the probability of ever raising a false alarm is at most q. Not covered:
    p-values that are not valid (a detector used outside its calibration, e.g. tiles in spatial order), and
    repeated looks at the same overlapping window, which are dependent across looks (the per-look statement
    still holds; the spending bound assumes each look's p-values are valid marginally, which they are).
    """

    def __init__(self, config: FDRConfig | None = None) -> None:
        self.config = config or FDRConfig()
        self.looks = 0

    def level(self, look: int) -> float:
        """The BH level at look ``look`` (1-based)."""
        if self.config.spending == "none":
            return self.config.q
        return self.config.q / (look * (look + 1))

    def step(self, pvalues: Mapping[str, float]) -> frozenset[str]:
        """One look: the regions declared drifting among ``pvalues``."""
        self.looks += 1
        return benjamini_hochberg(pvalues, self.level(self.looks), self.config.dependence)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"config": self.config.model_dump(), "looks": self.looks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` output."""
        self.config = FDRConfig.model_validate(state["config"])
        self.looks = int(state["looks"])
