"""Import a user's PyTorch checkpoint into the terradapt checkpoint format (``terradapt import-model``).

Accepted inputs: a plain state dict saved with ``torch.save``, a Lightning-style ``{"state_dict": {...}, ...}``
(also ``model_state_dict`` / ``model``), or a ``.safetensors`` file. ``torch.load`` runs with
``weights_only=True`` only: a checkpoint that needs code to unpickle (a pickled module, optimiser closure or any
``__reduce__`` payload) is refused with ``UnsafeCheckpointError`` and nothing in it runs.

Keys are matched to the network of the chosen architecture (``SegmentationModel.net``: an smp model's own keys,
``encoder.conv1.weight`` ...). A training wrapper's prefix (``model.``, ``net.``, ``module.``) is found
automatically, or given. Missing keys and shape mismatches are errors that list the keys; unexpected keys are an
error too unless the caller allows them (a Lightning checkpoint may carry a loss module's weights). The result is
``weights.safetensors`` + ``manifest.json`` recording the source file's sha256 (``source_checkpoint``).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from terradapt.architectures import ArchSpec, architecture_of, model_from_config
from terradapt.checkpoint import ModelManifest, sha256_hex
from terradapt.errors import TerradaptError
from terradapt.model import SegmentationModel

#: containers a training framework wraps the state dict in, tried in order
STATE_KEYS = ("state_dict", "model_state_dict", "model")
#: shown per list in an error message
_SHOW = 10


class UnsafeCheckpointError(TerradaptError, ValueError):
    """The checkpoint needs code to unpickle (refused: ``torch.load(weights_only=True)`` only)."""

    reason = "unsafe_checkpoint"


class CheckpointImportError(TerradaptError, ValueError):
    """The checkpoint does not hold the weights of the chosen architecture (missing, unexpected, wrong shape)."""

    reason = "checkpoint_mismatch"


@dataclass(frozen=True)
class ImportReport:
    """What the import matched: the prefix stripped, keys loaded, keys ignored (allowed unexpected ones)."""

    sha256: str
    prefix: str
    loaded: int
    ignored: tuple[str, ...] = field(default=())


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint file and its sha256 (never unpickles code).

    Raises:
        UnsafeCheckpointError: the file needs code to unpickle.
        CheckpointImportError: no state dict of tensors in it.

    """
    data = path.read_bytes()
    digest = sha256_hex(data)
    if path.suffix == ".safetensors":
        return dict(st_load(data)), digest
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused, it needs code to unpickle (only tensors and plain containers are read, "
            f"torch.load(weights_only=True)): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointImportError(f"{path}: not a PyTorch checkpoint: {exc}") from exc
    return _unwrap(obj, path), digest


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return {str(k): v for k, v in inner.items()}
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise CheckpointImportError(
        f"{path}: no state dict found (expected a dict of tensors, or one under {list(STATE_KEYS)})"
    )


def find_prefix(provided: Sequence[str], expected: Sequence[str]) -> str:
    """The prefix that, stripped from the checkpoint's keys, matches the most expected keys ('' if none helps)."""
    wanted = set(expected)
    counts: dict[str, int] = {}
    for key in provided:
        for i in [0] + [j + 1 for j, ch in enumerate(key) if ch == "."]:
            if key[i:] in wanted:
                counts[key[:i]] = counts.get(key[:i], 0) + 1
    return max(sorted(counts), key=lambda p: counts[p], default="")


def match_state(
    state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    prefix: str | None = None,
    allow_unexpected: bool = False,
) -> tuple[dict[str, torch.Tensor], str, tuple[str, ...]]:
    """Map a checkpoint's tensors onto ``target``'s keys: (state to load, prefix used, ignored keys).

    Raises:
        CheckpointImportError: missing keys, shape mismatches, or unexpected keys (unless allowed).

    """
    used = find_prefix(list(state), list(target)) if prefix is None else prefix
    mapped = {k[len(used) :]: v for k, v in state.items() if k.startswith(used)}
    outside = sorted(k for k in state if not k.startswith(used))
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target)) + outside
    shapes = sorted(
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(mapped) & set(target)
        if mapped[k].shape != target[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (allow them to ignore): {_listing(unexpected)}")
    if problems:
        raise CheckpointImportError(f"prefix {used!r}: " + "; ".join(problems))
    return {k: v for k, v in mapped.items() if k in target}, used, tuple(unexpected)


def _listing(items: Sequence[str]) -> str:
    more = f" ... (+{len(items) - _SHOW})" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def import_checkpoint(
    path: Path,
    spec: ArchSpec,
    *,
    classes: tuple[str, ...],
    bands: tuple[str, ...],
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    prefix: str | None = None,
    allow_unexpected: bool = False,
) -> tuple[SegmentationModel, ModelManifest, ImportReport]:
    """Build ``spec``'s network, load the checkpoint's weights into it, and describe it.

    Args:
        path: the user's checkpoint.
        spec: the architecture (``terradapt.architectures.resolve_arch``).
        classes: class names (their count must be the architecture's).
        bands: band names (their count must be the architecture's input channels).
        normalisation: per-band (mean, std) in raw band units the model was trained with; the preset's when None.
        prefix: the key prefix to strip (found automatically when None).
        allow_unexpected: ignore checkpoint keys the network does not have instead of failing.

    Raises:
        UnsafeCheckpointError: the file needs code to unpickle.
        CheckpointImportError: keys or shapes do not match, or names/normalisation are missing or inconsistent.

    """
    cfg = spec.config
    if len(classes) != cfg.num_classes or len(bands) != cfg.in_channels:
        raise CheckpointImportError(
            f"{len(classes)} class names and {len(bands)} band names for a model of {cfg.num_classes} classes "
            f"and {cfg.in_channels} bands"
        )
    norm = normalisation or spec.normalisation
    if norm is None:
        raise CheckpointImportError(
            "no normalisation: give the per-band mean and std (raw band units) the model was trained with"
        )
    if len(norm[0]) != cfg.in_channels or len(norm[1]) != cfg.in_channels:
        raise CheckpointImportError(f"normalisation needs {cfg.in_channels} means and {cfg.in_channels} stds")
    state, digest = read_state_dict(path)
    model = model_from_config(cfg)
    loaded, used, ignored = match_state(state, model.net.state_dict(), prefix=prefix, allow_unexpected=allow_unexpected)
    model.net.load_state_dict(loaded, strict=True)
    model.set_normalisation(norm[0], norm[1])
    model.eval()
    manifest = ModelManifest(
        architecture=architecture_of(cfg),
        config=cfg.to_dict(),
        classes=classes,
        bands=bands,
        method="import",
        source_checkpoint=digest,
    )
    return model, manifest, ImportReport(sha256=digest, prefix=used, loaded=len(loaded), ignored=ignored)
