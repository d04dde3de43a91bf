"""Settings -> the objects the pipeline is made of, in one place for every runner.

The embedded runner and the Kafka workers differ only in where objects and state live (memory and folders, or
MinIO and faust tables); everything a setting configures (predictor, deployer and rollout policy, monitor,
trigger, adaptation, gate, raster contract, regions, buffers, retries) is built here from the same ``Settings``.
"""

from __future__ import annotations

from collections.abc import Callable

from serving.label_store import LabelStore
from serving.predictor import InProcessPredictor, Predictor
from serving.registry import ModelRegistry
from serving.rollout import Deployer, InProcessDeployer
from serving.store import BlobStore, MemoryReader, MemoryStore, TileReader
from stream.config import Settings
from stream.embedded import EmbeddedRunner, RunRecorder, RunResult, TileLog
from stream.observer import NullObserver, Observers, PipelineObserver
from stream.pipeline import Pipeline
from stream.topics import Topics
from terradapt.raster import RasterSpec


def raster_spec(settings: Settings) -> RasterSpec:
    """The input contract of acquisitions (bands, CRS, size limits) from ``stream`` settings."""
    sc = settings.stream
    return RasterSpec(
        band_count=sc.band_count,
        expected_crs=sc.expected_crs,
        require_crs=sc.expected_crs is not None,
        max_bytes=sc.max_tile_bytes,
        max_pixels=sc.max_tile_pixels,
        max_decoded_bytes=sc.max_decoded_bytes,
    )


def predictor_and_deployer(settings: Settings, registry: ModelRegistry) -> tuple[Predictor, Deployer]:
    """The configured predictor and its deployer (``runtime.predictor``: in-process, or TorchServe).

    Raises:
        ValueError: ``torchserve`` without a model store folder.

    """
    rt = settings.runtime
    if rt.predictor == "torchserve":
        from serving.torchserve import TorchServeClient, TorchServeDeployer, TorchServePredictor

        ts = settings.torchserve
        if ts.model_store is None:
            raise ValueError("predictor='torchserve' needs TERRADAPT_TORCHSERVE__MODEL_STORE (the model store folder)")
        client = TorchServeClient(ts)
        deployer = TorchServeDeployer(
            client, registry, ts.model_store, gate=settings.adaptation.gate, config=ts.rollout
        )
        return TorchServePredictor(client, on_missing=deployer.sync), deployer
    predictor = InProcessPredictor(
        registry, device=rt.device, window=rt.window, overlap=rt.overlap, batch_size=rt.batch_size
    )
    return predictor, InProcessDeployer(registry)


def configure_threads(settings: Settings) -> None:
    """Set torch's intra-op threads of this process from ``runtime.torch_threads`` (0 leaves torch's default).

    Done where every runner builds its pipeline, before a model is loaded: the worker, the adaptation worker, the
    embedded runner and the demo.
    """
    threads = settings.runtime.torch_threads
    if threads:
        import torch  # here: ``stream.build`` is imported by tools that never compute

        torch.set_num_threads(threads)


def build_pipeline(
    settings: Settings,
    *,
    registry: ModelRegistry,
    reader: TileReader,
    predictions: BlobStore | None,
    observer: PipelineObserver | None = None,
    spec: RasterSpec | None = None,
    predictor: Predictor | None = None,
    deployer: Deployer | None = None,
) -> Pipeline:
    """The pipeline every runner drives, configured by ``settings``.

    ``predictor``/``deployer`` default to the configured ones; ``spec`` to the ``stream`` settings' contract (the
    demo passes its dataset's bands). Delayed labels are kept for few-shot adaptation under ``labels/`` in the
    prediction store (same bucket or folder; region codes never spell ``labels``).
    """
    configure_threads(settings)
    if predictor is None or deployer is None:
        built = predictor_and_deployer(settings, registry)
        predictor = predictor or built[0]
        deployer = deployer or built[1]
    sc = settings.stream
    return Pipeline(
        registry=registry,
        predictor=predictor,
        deployer=deployer,
        reader=reader,
        predictions=predictions,
        labels=(
            None
            if predictions is None
            else LabelStore(predictions, reader, max_tiles=settings.adaptation.few_shot.max_labels)
        ),
        adaptation=settings.adaptation,
        monitor_config=settings.monitor,
        trigger_config=settings.trigger,
        spec=spec or raster_spec(settings),
        regions=frozenset(sc.regions) if sc.regions else None,
        buffer_tiles=sc.buffer_tiles,
        predict_retries=sc.predict_retries,
        label_window=sc.label_window,
        topics=Topics.with_prefix(settings.kafka.topic_prefix),
        observer=observer or NullObserver(),
    )


def embedded_runner(
    settings: Settings,
    registry: ModelRegistry,
    predictions: BlobStore | None,
    *,
    spec: RasterSpec | None = None,
    observer: PipelineObserver | None = None,
    label_delay: int = 3,
    on_tile: Callable[[TileLog], None] | None = None,
) -> EmbeddedRunner:
    """An embedded runner over a registry that already holds the source model and its calibration.

    Acquisitions live in a bounded in-memory store: per region, the last ``buffer_tiles`` acquisitions and their
    pending labels (what jobs and delayed labels read back), like a lifecycle rule on a bucket.
    """
    objects = MemoryStore("acquisitions", per_prefix=2 * (settings.stream.buffer_tiles + label_delay) + 2)
    recorder = RunRecorder(RunResult(), on_tile)
    pipeline = build_pipeline(
        settings,
        registry=registry,
        reader=MemoryReader(objects),
        predictions=predictions,
        observer=recorder if observer is None else Observers(recorder, observer),
        spec=spec,
    )
    return EmbeddedRunner(pipeline, objects, recorder, label_delay=label_delay)
