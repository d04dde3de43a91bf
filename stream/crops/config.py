"""Settings of the crop loop (the ``[crops]`` section, ``TERRADAPT_CROPS__*``): every piece's own small config.

Units are parcels: the monitor's windows and expected run time, the trigger's counts and the buffer all count
parcels of one region. The defaults were set on the tuning country (``dk-1``) and the source countries; the
benchmark's held-out countries are not used to choose them (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from adapters.crops.gate import CropGateConfig
from adapters.crops.registry import available_crop_adapters
from adapters.trigger import TriggerConfig
from monitoring.series_monitor import SeriesMonitorConfig
from terradapt.settings import StrictModel

__all__ = ["QUICK_CROP_DEMO", "CropDemoConfig", "CropLoopConfig"]


class CropDemoConfig(StrictModel):
    """``terradapt demo --task crops``: how many synthetic parcels, how long to train, where the report goes."""

    source_parcels: int = Field(default=400, ge=16, description="labelled parcels per source country")
    calibration_parcels: int = Field(default=150, ge=16, description="held-out parcels per source country")
    stream_parcels: int = Field(default=300, ge=16, description="unlabelled parcels streamed per target country")
    test_parcels: int = Field(default=400, ge=16, description="labelled held-out parcels per target (scores)")
    epochs: int = Field(default=10, ge=1, description="source training epochs")
    targets: tuple[str, ...] = Field(
        default=("fr-2", "lv-1", "pt-1"),
        description="target countries: fr-2 (the source's conditions, unshifted) or any synthetic country",
    )
    workdir: Path = Path(".terradapt/crops-demo")
    report_dir: Path = Path("report/crops")
    seed: int = 0


#: ``terradapt demo --task crops --quick``: a configuration for tests and smoke runs
QUICK_CROP_DEMO: dict[str, Any] = {
    "source_parcels": 200,
    "calibration_parcels": 64,
    "stream_parcels": 160,
    "test_parcels": 120,
    "epochs": 8,
    "targets": ("fr-2", "lv-1"),
}


class CropLoopConfig(StrictModel):
    """The crop loop: monitor, trigger, method and its config, gate, buffer and batch sizes."""

    method: str = Field(default="phenology-bn", description="crop adaptation method (adapters.crops.registry)")
    method_config: dict[str, Any] = Field(default_factory=dict, description="the method's own config")
    monitor: SeriesMonitorConfig = Field(default_factory=SeriesMonitorConfig)
    trigger: TriggerConfig = Field(
        default_factory=lambda: TriggerConfig(min_tiles=64, cooldown_tiles=150, max_versions=3)
    )
    gate: CropGateConfig = Field(default_factory=CropGateConfig)
    buffer_parcels: int = Field(default=96, ge=8, description="recent valid parcels kept per region")
    gate_parcels: int = Field(
        default=32, ge=4, description="the buffer's latest parcels: judged by the gate, not adapted on"
    )
    batch_parcels: int = Field(default=16, ge=1, description="parcels of a region predicted together")
    pixels: int = Field(default=16, ge=1, description="pixels sampled per parcel and date")
    max_nan_share: float = Field(default=0.2, ge=0.0, le=1.0, description="series with more NaN are dead letters")
    label_window: int = Field(default=50, ge=1, description="labelled parcels per (region, version) accuracy window")
    seed: int = 0
    demo: CropDemoConfig = Field(default_factory=CropDemoConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in available_crop_adapters():
            raise ValueError(f"method {v!r}: available crop methods are {available_crop_adapters()}")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> CropLoopConfig:
        if self.gate_parcels >= self.buffer_parcels:
            raise ValueError(f"gate_parcels={self.gate_parcels} must be below buffer_parcels={self.buffer_parcels}")
        if self.trigger.min_tiles > self.buffer_parcels:
            raise ValueError(
                f"trigger.min_tiles={self.trigger.min_tiles} parcels can never be buffered: "
                f"buffer_parcels={self.buffer_parcels}"
            )
        return self
