"""Source-training protocols: how the shared source model is trained, with regions as domains.

Why more than one: the source model is the starting point of every region's lineage, and how it was trained
decides how much a new region costs. Plain ERM fits the source radiometry exactly; ``erm-aug`` trains through
strong radiometric augmentation (``terradapt.augment``) so that calibration and haze changes hurt less; ``irm``
(IRMv1, Arjovsky et al. 2019) asks for a classifier that is simultaneously optimal in every source region, so
features that only work in some regions are penalised; ``reptile`` (Nichol et al. 2018, a first-order relative
of MAML) learns an initialisation from which a few gradient steps on one region's tiles go far, which is what a
few-shot fine-tuning on labelled tiles of a new region needs.

Every protocol has its own typed config (unknown keys rejected) and an explicit registry entry;
``train_source_model(..., protocol=name, protocol_config={...}, domains=regions)`` runs one. A domain is a
sample's region (``Sample.region``: a departement or a dataset area). The loss ignores ``IGNORE_INDEX``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, Field
from torch.nn import functional as F  # noqa: N812

from terradapt.augment import RadiometricAugmentConfig, radiometric_augment
from terradapt.classes import IGNORE_INDEX
from terradapt.errors import UnknownNameError
from terradapt.model import SegmentationModel
from terradapt.settings import StrictModel

if TYPE_CHECKING:
    from terradapt.training import TrainConfig

__all__ = [
    "ERM",
    "IRM",
    "ERMAugConfig",
    "ERMAugmented",
    "ERMConfig",
    "IRMConfig",
    "ProtocolConfig",
    "RadiometricAugmentConfig",
    "Reptile",
    "ReptileConfig",
    "SourceData",
    "TrainingProtocol",
    "available_protocols",
    "create_protocol",
    "get_protocol",
    "irm_penalty",
    "radiometric_augment",
]

Array = npt.NDArray[np.uint8]
Progress = Callable[[int, float], None] | None


class SourceData:
    """Labelled source tiles grouped by domain, and the random-crop sampler every protocol draws batches from.

    Args:
        images: (C, H, W) uint8 tiles.
        masks: (H, W) class-index masks (IGNORE_INDEX ignored).
        domains: the domain (region) of every tile; one domain ``"source"`` when None.

    Raises:
        ValueError: lengths differ, or there is no tile.

    """

    def __init__(self, images: Sequence[Array], masks: Sequence[Array], domains: Sequence[str] | None = None) -> None:
        if not images or len(images) != len(masks):
            raise ValueError(f"need as many masks as images (>= 1): {len(images)} images, {len(masks)} masks")
        names = list(domains) if domains is not None else ["source"] * len(images)
        if len(names) != len(images):
            raise ValueError(f"domains: {len(names)} names for {len(images)} images (one region per image)")
        self.images, self.masks = images, masks
        self.by_domain: dict[str, npt.NDArray[np.int64]] = {
            d: np.flatnonzero(np.asarray(names) == d) for d in sorted(set(names))
        }

    @property
    def domains(self) -> list[str]:
        """Domain names, sorted."""
        return list(self.by_domain)

    def batch(
        self,
        size: int,
        crop: int,
        rng: np.random.Generator,
        *,
        domain: str | None = None,
        augment: RadiometricAugmentConfig | None = None,
        augment_rng: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crops with random 90-degree rotations and flips, from all tiles or one domain's.

        Without ``augment`` the draws are exactly those ERM always made (same seed, same batches). With it, each
        crop's radiometry is perturbed by ``radiometric_augment`` drawing from ``augment_rng``.
        """
        pool = self.by_domain[domain] if domain is not None else None
        if pool is None:
            picks = rng.integers(0, len(self.images), size=size)
        else:
            picks = pool[rng.integers(0, len(pool), size=size)]
        aug_rng = augment_rng if augment_rng is not None else rng
        xs, ys = [], []
        for i in picks:
            im, mk = self.images[i], self.masks[i]
            h, w = mk.shape
            c = min(crop, h, w)
            r0, c0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            x, y = im[:, r0 : r0 + c, c0 : c0 + c], mk[r0 : r0 + c, c0 : c0 + c]
            k = int(rng.integers(0, 4))
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, ::-1]
            x = np.ascontiguousarray(x)
            xs.append(radiometric_augment(x, aug_rng, augment) if augment is not None else x)
            ys.append(np.ascontiguousarray(y))
        return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long()


def irm_penalty(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """IRMv1 penalty of one domain: the squared gradient of its risk w.r.t. a dummy classifier scale at 1.0.

    Why: if the classifier on top of the features is optimal for this domain, rescaling its logits cannot lower
    the domain's risk, so the derivative at scale 1 is zero. Summed over domains it is small only when the same
    classifier is optimal everywhere (Arjovsky et al. 2019, eq. IRMv1). ``create_graph`` keeps it differentiable.

    Args:
        logits: (N, K, H, W) logits of one domain's batch.
        target: (N, H, W) class indices.
        ignore_index: label value that does not count.

    Returns:
        A scalar tensor (0 when the batch has no labelled pixel).

    """
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    scale = torch.ones((), device=logits.device, requires_grad=True)
    risk = F.cross_entropy(logits * scale, target, ignore_index=ignore_index)
    (grad,) = torch.autograd.grad(risk, [scale], create_graph=True)
    penalty: torch.Tensor = grad.pow(2)
    return penalty


class ProtocolConfig(StrictModel):
    """Base of every protocol's own config (unknown keys are errors)."""


class ERMConfig(ProtocolConfig):
    """ERM has no knob of its own: ``TrainConfig`` holds the optimisation settings."""


class ERMAugConfig(ProtocolConfig):
    """Config of ERM with radiometric augmentation."""

    augment: RadiometricAugmentConfig = Field(default_factory=RadiometricAugmentConfig)


class IRMConfig(ProtocolConfig):
    """Config of IRMv1: weight 1 until the anneal step, then the full weight (DomainBed's schedule).

    The defaults are milder than DomainBed's (100 after 500 steps) because the source budget here is hundreds of
    steps, not thousands: a model whose logits are constant has zero penalty, and a large weight switched on
    before the risk has come down drives an under-trained model there (measured on the synthetic departements:
    weight 10 from step 20 of 60 collapsed to below the majority-class accuracy).
    """

    penalty_weight: float = Field(default=10.0, ge=0, description="weight of the IRMv1 penalty after annealing")
    anneal_steps: int = Field(default=100, ge=0, description="steps with weight 1.0 before the full weight")
    domain_batch: int | None = Field(
        default=None, ge=1, description="crops per domain and step (None: batch_size // domains, at least 1)"
    )
    augment: RadiometricAugmentConfig | None = Field(
        default_factory=RadiometricAugmentConfig, description="radiometric augmentation (None = off)"
    )


class ReptileConfig(ProtocolConfig):
    """Config of Reptile; ``TrainConfig.steps`` counts inner steps, so episodes = steps // inner_steps."""

    inner_steps: int = Field(default=5, ge=1, description="gradient steps on one domain per episode")
    inner_lr: float | None = Field(default=None, gt=0, description="inner learning rate (None: TrainConfig.lr)")
    inner_optimizer: Literal["adam", "sgd"] = "adam"
    meta_lr: float = Field(default=0.5, gt=0, le=1, description="fraction of the way toward the adapted weights")
    anneal_meta_lr: bool = Field(default=True, description="decay meta_lr linearly to 0 over the episodes")
    augment: RadiometricAugmentConfig | None = Field(
        default_factory=RadiometricAugmentConfig, description="radiometric augmentation (None = off)"
    )


class TrainingProtocol(ABC):
    """One way to train the source model: ``fit`` trains a normalised, freshly built model in place."""

    name: ClassVar[str]
    config_class: ClassVar[type[ProtocolConfig]] = ERMConfig

    def __init__(self, config: ProtocolConfig | None = None) -> None:
        self.config = config or self.config_class()

    @abstractmethod
    def fit(
        self,
        model: SegmentationModel,
        data: SourceData,
        train: TrainConfig,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        """Train ``model`` (train mode, on its device) for ``train.steps`` steps.

        Args:
            model: the model, its normalisation already set from the source tiles.
            data: the source tiles and their domains.
            train: optimisation settings (steps, batch size, crop, learning rate, weight decay, seed).
            rng: the crop sampler's generator (seeded with ``train.seed``).
            progress: called with (step, loss) after every step, if not None.

        """

    @staticmethod
    def _optimiser(
        model: SegmentationModel, train: TrainConfig
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()


class ERM(TrainingProtocol):
    """Empirical risk minimisation over all source tiles pooled: the historical default, batch for batch."""

    name = "erm"

    def _augment(self) -> RadiometricAugmentConfig | None:
        return None

    def fit(
        self,
        model: SegmentationModel,
        data: SourceData,
        train: TrainConfig,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        device = next(model.parameters()).device
        opt, sched = self._optimiser(model, train)
        augment = self._augment()
        # a second generator: the crops stay those of plain ERM whatever the augmentation draws
        aug_rng = np.random.default_rng([train.seed, 1])
        for step in range(train.steps):
            x, y = data.batch(train.batch_size, train.crop, rng, augment=augment, augment_rng=aug_rng)
            loss = F.cross_entropy(model(x.to(device)), y.to(device), ignore_index=IGNORE_INDEX)
            _step(opt, loss)
            sched.step()
            if progress is not None:
                progress(step + 1, float(loss.detach()))


class ERMAugmented(ERM):
    """ERM on radiometrically augmented crops (per sample, on raw 0..255 pixels, before normalisation)."""

    name = "erm-aug"
    config_class = ERMAugConfig
    config: ERMAugConfig

    def _augment(self) -> RadiometricAugmentConfig | None:
        return self.config.augment


class IRM(TrainingProtocol):
    """IRMv1: mean per-domain risk plus the weighted mean per-domain penalty, every domain in every step.

    All domains' crops go through the network in one forward pass, so BatchNorm normalises with statistics
    over every domain, as the deployed model will. When the penalty weight jumps at ``anneal_steps`` the Adam
    moments are reset and the loss is divided by the weight (as DomainBed does): otherwise the moments, sized
    for the small pre-anneal loss, would turn the jump into a huge first step.
    """

    name = "irm"
    config_class = IRMConfig
    config: IRMConfig

    def fit(
        self,
        model: SegmentationModel,
        data: SourceData,
        train: TrainConfig,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        device = next(model.parameters()).device
        opt, sched = self._optimiser(model, train)
        cfg = self.config
        per_domain = cfg.domain_batch or max(1, train.batch_size // len(data.domains))
        aug_rng = np.random.default_rng([train.seed, 1])
        for step in range(train.steps):
            batches = [
                data.batch(per_domain, train.crop, rng, domain=d, augment=cfg.augment, augment_rng=aug_rng)
                for d in data.domains
            ]
            x = torch.cat([b[0] for b in batches]).to(device)
            ys = [b[1].to(device) for b in batches]
            logits = model(x).split(per_domain)
            risks = [F.cross_entropy(lg, y, ignore_index=IGNORE_INDEX) for lg, y in zip(logits, ys, strict=True)]
            labelled = [i for i, y in enumerate(ys) if bool((y != IGNORE_INDEX).any())]
            if not labelled:  # nothing to learn from in this draw
                continue
            risk = torch.stack([risks[i] for i in labelled]).mean()
            penalty = torch.stack([irm_penalty(logits[i], ys[i]) for i in labelled]).mean()
            weight = cfg.penalty_weight if step >= cfg.anneal_steps else 1.0
            if step == cfg.anneal_steps and cfg.anneal_steps > 0:
                opt.state.clear()
            loss = (risk + weight * penalty) / max(weight, 1.0)
            _step(opt, loss)
            sched.step()
            if progress is not None:
                progress(step + 1, float(risk.detach()))


class Reptile(TrainingProtocol):
    """First-order meta-learning: adapt a copy to one domain, then move the meta-weights part of the way.

    Each episode samples one source region (a "task"), runs ``inner_steps`` steps on a copy of the model with a
    fresh optimiser (Adam with beta1 = 0, as Nichol et al. use, so no momentum leaks across tasks), and moves
    every parameter and BatchNorm statistic ``meta_lr`` of the way toward the copy. The result is an
    initialisation from which a few steps on one region's labelled tiles fit that region well; it is also a
    usable model on its own. Progress counts inner steps.
    """

    name = "reptile"
    config_class = ReptileConfig
    config: ReptileConfig

    def _inner_optimiser(self, model: SegmentationModel, train: TrainConfig) -> torch.optim.Optimizer:
        lr = self.config.inner_lr or train.lr
        if self.config.inner_optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=train.weight_decay)
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.0, 0.999), weight_decay=train.weight_decay)

    def fit(
        self,
        model: SegmentationModel,
        data: SourceData,
        train: TrainConfig,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        device = next(model.parameters()).device
        cfg = self.config
        episodes = max(1, train.steps // cfg.inner_steps)
        aug_rng = np.random.default_rng([train.seed, 1])
        domains = data.domains
        for episode in range(episodes):
            domain = domains[int(rng.integers(0, len(domains)))]
            fast = copy.deepcopy(model).train()
            opt = self._inner_optimiser(fast, train)
            for inner in range(cfg.inner_steps):
                x, y = data.batch(
                    train.batch_size, train.crop, rng, domain=domain, augment=cfg.augment, augment_rng=aug_rng
                )
                loss = F.cross_entropy(fast(x.to(device)), y.to(device), ignore_index=IGNORE_INDEX)
                _step(opt, loss)
                if progress is not None:
                    progress(episode * cfg.inner_steps + inner + 1, float(loss.detach()))
            eps = cfg.meta_lr * (1 - episode / episodes) if cfg.anneal_meta_lr else cfg.meta_lr
            _interpolate(model, fast, eps)


@torch.no_grad()
def _interpolate(model: torch.nn.Module, toward: torch.nn.Module, eps: float) -> None:
    """Move every float tensor of ``model``'s state ``eps`` of the way toward ``toward``'s; copy the counters."""
    target = toward.state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            value.add_(target[name] - value, alpha=eps)
        else:
            value.copy_(target[name])


_PROTOCOLS: dict[str, type[TrainingProtocol]] = {cls.name: cls for cls in (ERM, ERMAugmented, IRM, Reptile)}


def available_protocols() -> list[str]:
    """Names of the registered source-training protocols (feeds ``terradapt train --protocol``)."""
    return sorted(_PROTOCOLS)


def get_protocol(name: str) -> type[TrainingProtocol]:
    """The class of a registered protocol; an unknown name lists the valid ones.

    Raises:
        UnknownNameError: ``name`` is not registered.

    """
    try:
        return _PROTOCOLS[name]
    except KeyError:
        raise UnknownNameError("training protocol", name, available_protocols()) from None


def create_protocol(name: str, config: dict[str, Any] | BaseModel | None = None) -> TrainingProtocol:
    """Build a registered protocol with its own config (validated: unknown keys and bad values are errors).

    Raises:
        UnknownNameError: ``name`` is not registered.
        pydantic.ValidationError: the config does not fit the protocol's config class.

    """
    cls = get_protocol(name)
    if isinstance(config, BaseModel):
        config = config.model_dump()
    return cls(cls.config_class.model_validate(config or {}))
