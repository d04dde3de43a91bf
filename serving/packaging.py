"""Build TorchServe archives (.mar) from registry versions.

One archive per (region, version): model name ``landcover-<REGION>``, TorchServe version = registry version.
``torch-model-archiver`` names every archive ``<model-name>.mar``, so each version is exported into its own
(temporary) folder and moved to ``<model_store>/landcover-<REGION>-v<version>.mar``. A unique *file name* per
version is what TorchServe 0.12 needs (measured): it registers archives by bare file name from the model store
root only (``landcover-D033/3/landcover-D033.mar`` answers 404), and a ``file://`` URL is copied into the store
root under its base name, so two versions both called ``landcover-D033.mar`` collide ("Model file already
exists", 500) even when they sit in different folders.

An archive holds:

* ``weights.safetensors`` + ``manifest.json`` exactly as the registry stores them (sha256 checked on the way out
  here and again by the handler when the worker loads them);
* ``handler.py`` (``serving/handler.py``) and a copy of the ``terradapt``, ``monitoring`` and ``serving``
  packages. TorchServe unpacks the archive and puts that folder first on the worker's ``sys.path``, so a model
  version always runs the code it was packaged with - not whatever the server's checkout or ``PYTHONPATH`` holds
  at the time a worker restarts. The alternative (``PYTHONPATH`` on the TorchServe process) would silently change
  the code behind already-deployed versions on every checkout, and breaks as soon as TorchServe runs elsewhere.
  That copy includes ``terradapt.architectures``, which rebuilds any architecture a manifest names; third-party
  libraries (torch, segmentation-models-pytorch for ``smp`` models) come from TorchServe's Python environment,
  which installs terradapt's declared dependencies;
* ``model-config.yaml``: worker count, response timeout and the handler's settings (``serving.codec.HandlerConfig``).

The archiver runs as a subprocess (``python -m model_archiver.model_packaging``, its public CLI) so that its
``logging.basicConfig`` and working-directory assumptions stay out of this process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from serving.codec import HandlerConfig
from serving.registry import ModelRegistry
from terradapt.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, ModelManifest
from terradapt.errors import TerradaptError
from terradapt.records import REGION_PATTERN

MODEL_PREFIX = "landcover-"
#: Packages copied into every archive: the handler's import closure (terradapt <- monitoring <- serving).
BUNDLED_PACKAGES = ("terradapt", "monitoring", "serving")
HANDLER_FILE = "handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PackagingError(TerradaptError):
    """torch-model-archiver failed, or an archive on disk does not hold what it should."""

    reason = "packaging_failed"


def model_name(region: str) -> str:
    """TorchServe model name of a region: ``landcover-D033`` (``landcover-source`` for the shared source model).

    Raises:
        ValueError: ``region`` is not a region code (it becomes part of a URL and a path).

    """
    if region != "source" and not REGION_PATTERN.match(region):
        raise ValueError(
            f"region {region!r} is not a region code: expected 'D0NN' (e.g. 'D033'), '<area>-<n>' or 'source'"
        )
    return f"{MODEL_PREFIX}{region}"


def archive_url(region: str, version: int) -> str:
    """The ``url`` to register: the archive's file name in the model store (``landcover-D033-v3.mar``)."""
    return f"{model_name(region)}-v{int(version)}.mar"


def archive_path(model_store: Path, region: str, version: int) -> Path:
    """Where the archive of (region, version) lives in the model store."""
    return Path(model_store) / archive_url(region, version)


def archived_manifest(path: Path) -> ModelManifest:
    """The terradapt manifest inside an archive (to check which weights it holds without unpacking it).

    Raises:
        PackagingError: The file is not an archive with a terradapt manifest.

    """
    try:
        with zipfile.ZipFile(path) as zf:
            return ModelManifest.model_validate_json(zf.read(MANIFEST_FILE))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise PackagingError(f"{path} is not a terradapt archive: {exc}") from exc


def package_version(
    registry: ModelRegistry,
    region: str,
    version: int,
    model_store: Path,
    *,
    config: HandlerConfig | None = None,
    force: bool = False,
) -> Path:
    """Export one registry version as a TorchServe archive in the model store; return the archive's path.

    Idempotent: an existing archive holding the same weights (same sha256) is kept unless ``force``. The archive
    is built in a temporary folder and moved into place, so TorchServe never sees a half-written file.

    Args:
        registry: Where the version's weights and manifest come from (sha256-verified).
        region: Region code; version 0 is the shared source model.
        version: Registry version, also the TorchServe version.
        model_store: TorchServe's model store folder.
        config: Handler settings written into the archive (defaults when None).
        force: Rebuild even if an archive with the same weights exists.

    Returns:
        The archive path, ``<model_store>/landcover-<REGION>-v<version>.mar``.

    Raises:
        ModelVersionNotFoundError: The registry has no such version.
        ChecksumMismatchError: The stored weights do not match their manifest.
        PackagingError: torch-model-archiver failed.

    """
    name = model_name(region)
    manifest = registry.manifest(region, version)
    target = archive_path(model_store, region, version)
    if target.is_file() and not force:
        try:
            if archived_manifest(target).sha256 == manifest.sha256:
                return target
        except PackagingError:
            pass  # unreadable leftover: rebuild it
    weights = registry.weights(region, version)
    config = config or HandlerConfig()
    target.parent.mkdir(parents=True, exist_ok=True)
    # the build folder is in the store (same file system: the final move is atomic); TorchServe ignores folders
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-v{int(version)}-", dir=target.parent) as tmp:
        stage = Path(tmp) / "stage"
        code = stage / "code"
        code.mkdir(parents=True)
        (stage / WEIGHTS_FILE).write_bytes(weights)
        (stage / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        (stage / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(config.model_config_yaml(), sort_keys=False))
        shutil.copy2(_PROJECT_ROOT / "serving" / HANDLER_FILE, stage / HANDLER_FILE)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
        for package in BUNDLED_PACKAGES:
            shutil.copytree(_PROJECT_ROOT / package, code / package, ignore=ignore)
        export = Path(tmp) / "export"
        export.mkdir()
        _run_archiver(
            [
                "--model-name", name,
                "--version", str(int(version)),
                "--handler", str(stage / HANDLER_FILE),
                "--serialized-file", str(stage / WEIGHTS_FILE),
                # a folder's *content* is copied to the archive root: code/terradapt -> terradapt/
                "--extra-files", f"{stage / MANIFEST_FILE},{code}",
                "--config-file", str(stage / MODEL_CONFIG_FILE),
                "--export-path", str(export),
                "--force",
            ]
        )  # fmt: skip
        built = export / f"{name}.mar"
        if not built.is_file():
            raise PackagingError(f"torch-model-archiver reported success but wrote no {built.name}")
        os.replace(built, target)
    return target


def _run_archiver(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackagingError(f"torch-model-archiver did not run: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PackagingError(f"torch-model-archiver exited {done.returncode}: {' | '.join(tail)}")


def remove_archive(model_store: Path, region: str, version: int) -> None:
    """Delete a version's archive from the model store (after it was unregistered)."""
    archive_path(model_store, region, version).unlink(missing_ok=True)
