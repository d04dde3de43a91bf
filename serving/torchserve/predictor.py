"""`TorchServePredictor`: the ``serving.predictor.Predictor`` contract over ``/predictions/landcover-<REGION>[/<v>]``.

It decodes the handler's JSON (``serving.codec``) into the same ``TileOutput`` the in-process predictor makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from affine import Affine

from serving.codec import decode_prediction
from serving.packaging import model_name
from serving.predictor import TileOutput
from serving.torchserve.client import TorchServeClient
from terradapt.errors import ModelVersionNotFoundError
from terradapt.raster import Raster, raster_to_geotiff_bytes


def encode_tile(image: npt.NDArray[np.uint8]) -> bytes:
    """A (C, H, W) uint8 array as GeoTIFF bytes (no CRS: the handler answers in pixel space)."""
    return raster_to_geotiff_bytes(Raster(np.ascontiguousarray(image, dtype=np.uint8), None, Affine.identity()))


class TorchServePredictor:
    """``Predictor`` over TorchServe: one request per tile, default version unless one is named.

    Args:
        client: The TorchServe client.
        on_missing: Called with the region when its model is not registered (for example
            ``TorchServeDeployer.sync``, which registers the registry's current version); the call is then retried
            once. Without it a missing model raises ``ModelVersionNotFoundError``.

    """

    def __init__(self, client: TorchServeClient, *, on_missing: Callable[[str], object] | None = None) -> None:
        self.client = client
        self.on_missing = on_missing

    def predict(
        self, region: str, images: Sequence[npt.NDArray[np.uint8]], version: int | None = None
    ) -> list[TileOutput]:
        """One output per image (C, H, W); large images are tiled by the handler."""
        return [self._predict(region, encode_tile(image), version) for image in images]

    def predict_uri(self, region: str, uri: str, version: int | None = None) -> TileOutput:
        """Predict an object the handler reads itself (``s3://bucket/key``): no upload size limit."""
        return self._predict(region, {"uri": uri}, version)

    def _predict(self, region: str, body: bytes | dict[str, Any], version: int | None) -> TileOutput:
        name = model_name(region)
        try:
            return decode_prediction(self.client.predict(name, body, version))
        except ModelVersionNotFoundError:
            if self.on_missing is None:
                raise
            self.on_missing(region)
            return decode_prediction(self.client.predict(name, body, version))
