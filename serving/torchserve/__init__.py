"""TorchServe as terradapt's serving backend, one file per role.

* ``client`` - `TorchServeClient`, the management/inference REST client (token auth, retries, typed errors);
* ``predictor`` - `TorchServePredictor`, the ``Predictor`` contract over the inference API;
* ``deployer`` - `TorchServeDeployer`, the ``Deployer`` contract (register, shadow check, set-default, rollback,
  prune) and `compare_outputs`, the gate on served outputs.
"""

from serving.torchserve.client import (
    PredictionRejectedError,
    TorchServeAuthError,
    TorchServeClient,
    TorchServeConflictError,
    TorchServeError,
    TorchServeUnavailableError,
    read_keys,
)
from serving.torchserve.deployer import PostCheck, TorchServeDeployer, compare_outputs
from serving.torchserve.predictor import TorchServePredictor, encode_tile
from terradapt.settings import RolloutConfig

__all__ = [
    "PostCheck",
    "PredictionRejectedError",
    "RolloutConfig",
    "TorchServeAuthError",
    "TorchServeClient",
    "TorchServeConflictError",
    "TorchServeDeployer",
    "TorchServeError",
    "TorchServePredictor",
    "TorchServeUnavailableError",
    "compare_outputs",
    "encode_tile",
    "read_keys",
]
