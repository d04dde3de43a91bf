"""ADDA: adversarial discriminative domain adaptation (Tzeng et al., CVPR 2017), for segmentation.

Why, next to DANN: DANN shares one network between domains and only nudges BatchNorm through a reversed
gradient. ADDA unties the domains: the *source encoder* stays frozen and defines what features should look
like; a *target encoder*, initialised from it, is trained against a discriminator until its features on target
tiles cannot be told from the source encoder's features on replayed source tiles. The classifier (here the whole
U-Net decoder and head) is never touched: it keeps working because its inputs come to look like source inputs.

Encoder = ``SegmentationModel.encoder_modules()``: the small U-Net's down blocks and bottleneck, an smp model's
``encoder`` (convolutions, BatchNorm scale/shift
and statistics); everything else, the decoder's BatchNorm statistics included, stays bit-identical and in eval
mode. The target encoder's BatchNorm statistics are re-estimated on the target tiles (pooled over every pixel
seen, ``PooledBNStats``), as the other methods do: the adversary then only has to fix what first and second
moments cannot.

Per-pixel, not pooled, features: the discriminator sees every bottleneck pixel of a tile as one sample (a 64 px
tile at depth 2 gives 256). A pooled (tile-mean) feature would give one sample per tile, so with the batch-of-one
streams terradapt adapts on the discriminator would learn from one target sample per step; and the decoder
decides per pixel, so matching only tile averages would leave the per-pixel feature distribution, which it reads,
free to stay shifted. The encoder uses the inverted-label GAN loss of the paper (target labelled "source"),
which gives stronger gradients than a reversed gradient when the discriminator wins. Conv weights train with a
small learning rate (Adam, beta1 0.5 as in the paper) because an adversary can also wreck features; the gate
stands behind every candidate.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adapters.base import Adapter, AdapterConfig
from adapters.common import PooledBNStats, SourceReplay
from adapters.coral import bottleneck_pixels
from terradapt.model import SegmentationModel


class ADDAConfig(AdapterConfig):
    """Config of ADDA."""

    lr: float = Field(default=1e-4, gt=0, description="target encoder learning rate")
    critic_lr: float = Field(default=1e-3, gt=0, description="discriminator learning rate")
    hidden: int = Field(default=32, ge=1, description="width of the discriminator's two hidden layers")
    steps: int = Field(default=1, ge=1, description="discriminator + encoder updates per batch")
    source_batch: int = Field(default=2, ge=1, description="source tiles replayed per step")
    seed: int = 0


def encoder_modules(model: SegmentationModel) -> list[nn.Module]:
    """The encoder part of the network (the small U-Net's down blocks and bottleneck; an smp model's encoder)."""
    return model.encoder_modules()


class ADDA(Adapter):
    """Adversarially train a target encoder copy against a frozen source encoder; decoder and head frozen."""

    name = "adda"
    config_class = ADDAConfig
    config: ADDAConfig
    source_replay = "required"

    def configure(self, model: SegmentationModel) -> None:
        if self.source_tiles is None:  # checked in Adapter.__init__; narrows the type
            raise ValueError("adda needs source_tiles")
        cfg = self.config
        self.replay = SourceReplay(self.source_tiles, self.name, cfg.seed)
        # the frozen source encoder (configure runs on source weights: at start and after every reset)
        self.source_net = copy.deepcopy(model).eval().requires_grad_(False)
        width = model.feature_dim
        with torch.random.fork_rng(devices=[]):  # seeded discriminator without touching the global RNG
            torch.manual_seed(cfg.seed)
            self.critic = nn.Sequential(
                nn.Linear(width, cfg.hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(cfg.hidden, cfg.hidden),
                nn.LeakyReLU(0.2),
                nn.Linear(cfg.hidden, 1),
            )
        self.critic.to(next(model.parameters()).device)
        model.eval().requires_grad_(False)
        params = [p for m in encoder_modules(model) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        self._encoder_train_mode()
        self.pooled = PooledBNStats(model, replaces=getattr(self, "pooled", None))
        self.encoder_opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.999))
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.999))
        self._fresh = True

    def _encoder_train_mode(self) -> None:
        """Encoder in train mode (batch statistics), decoder and head in eval mode (source statistics)."""
        self.model.eval()
        for m in encoder_modules(self.model):
            m.train()

    def changed_names(self) -> set[str]:
        encoder = [id(m) for m in encoder_modules(self.model)]
        prefixes = tuple(f"{name}." for name, m in self.model.named_modules() if id(m) in encoder)
        return {k for k in self.model.state_dict() if k.startswith(prefixes)}

    def adapt_step(self, batch: torch.Tensor) -> None:
        self._encoder_train_mode()
        if self._fresh:  # the source running statistics of the encoder give way to the target's
            for m in encoder_modules(self.model):
                for bn in m.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.reset_running_stats()
            self._fresh = False
        for _ in range(self.config.steps):
            with torch.no_grad():
                source = bottleneck_pixels(self.source_net, self.replay.sample(self.config.source_batch, batch.device))
            target = bottleneck_pixels(self.model, batch)
            # discriminator: source pixels -> 1, target pixels -> 0 (each domain weighted equally)
            d_loss = self._bce(self.critic(source), 1.0) + self._bce(self.critic(target.detach()), 0.0)
            self.critic_opt.zero_grad(set_to_none=True)
            d_loss.backward()  # type: ignore[no-untyped-call]
            self.critic_opt.step()
            # target encoder: make its pixels pass for source (inverted labels)
            g_loss = self._bce(self.critic(target), 1.0)
            self.encoder_opt.zero_grad(set_to_none=True)
            g_loss.backward()  # type: ignore[no-untyped-call]
            self.encoder_opt.step()
        self.pooled.write()

    @staticmethod
    def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), torch.full_like(logits.squeeze(1), label))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            fresh=self._fresh,
            critic={k: v.clone() for k, v in self.critic.state_dict().items()},
            encoder_opt=copy.deepcopy(self.encoder_opt.state_dict()),
            critic_opt=copy.deepcopy(self.critic_opt.state_dict()),
            generator=self.replay.generator.get_state(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fresh = bool(state["fresh"])
        self.critic.load_state_dict(state["critic"])
        self.encoder_opt.load_state_dict(state["encoder_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.replay.generator.set_state(state["generator"])
