"""``terradapt ingest`` dates each acquisition from the data or the options, never from the time of ingest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from typer.testing import CliRunner

from serving.store import MemoryStore
from stream.cli import app
from stream.kafka import ingest as ingest_module
from stream.kafka.ingest import acquisition_for, ingest
from terradapt.capture_time import CaptureTimes
from terradapt.raster import Raster, raster_to_geotiff_bytes
from terradapt.records import Acquisition

WHEN = datetime(2021, 6, 14, 10, 22, tzinfo=UTC)


class Collect:
    def __init__(self) -> None:
        self.sent: list[Acquisition] = []

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append(Acquisition.from_stac(value))

    def close(self) -> None:
        pass


def _tile(path: Path, seed: int, tag: str | None = None) -> Path:
    image = np.random.default_rng(seed).integers(0, 255, (5, 32, 32)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raster_to_geotiff_bytes(Raster(image, "EPSG:2154", Affine(0.2, 0, 400_000, 0, -0.2, 6.4e6))))
    if tag is not None:
        with rasterio.open(path, "r+") as dst:
            dst.update_tags(TIFFTAG_DATETIME=tag)
    return path


def test_acquisition_for_reads_the_tag_and_the_grid(tmp_path: Path):
    data = _tile(tmp_path / "a.tif", 0, "2021:06:14 10:22:00").read_bytes()
    acq = acquisition_for(data, "D033", "memory://acquisitions/D033/a.tif")
    assert acq.datetime == WHEN
    assert acq.shape == (32, 32) and acq.transform == (0.2, 0.0, 400_000.0, 0.0, -0.2, 6.4e6)
    assert acquisition_for(_tile(tmp_path / "b.tif", 1).read_bytes(), "D033", "x").datetime is None


def test_ingest_dates_each_file_from_its_source(tmp_path: Path):
    root = tmp_path / "flair"
    root.mkdir()
    (root / "flair-1_metadata_aerial.json").write_text(json.dumps({"IMG_1": {"date": "2020-07-01", "time": "9h05"}}))
    tagged = _tile(root / "img" / "IMG_0.tif", 0, "2021:06:14 10:22:00")
    flair = _tile(root / "img" / "IMG_1.tif", 1)
    listed = _tile(root / "img" / "IMG_2.tif", 2)
    undated = _tile(root / "img" / "IMG_3.tif", 3)
    publisher = Collect()
    start, end = datetime(2019, 4, 1, tzinfo=UTC), datetime(2019, 9, 30, tzinfo=UTC)
    times = CaptureTimes(table={"IMG_2": datetime(2018, 5, 2, tzinfo=UTC)}, campaign_start=start, campaign_end=end)
    report = ingest([tagged, flair, listed, undated], "D033", MemoryStore(), publisher, "t", times=times)
    assert report.ok
    got = [(a.datetime, a.start_datetime, a.end_datetime) for a in publisher.sent]
    assert got == [
        (WHEN, None, None),
        (datetime(2020, 7, 1, 9, 5, tzinfo=UTC), None, None),
        (datetime(2018, 5, 2, tzinfo=UTC), None, None),
        (None, start, end),
    ]


def test_ingest_requiring_a_time_reports_undated_files_unpublished(tmp_path: Path):
    publisher = Collect()
    report = ingest(
        [_tile(tmp_path / "x.tif", 0)], "D033", MemoryStore(), publisher, "t", times=CaptureTimes(require=True)
    )
    assert not report.ok and publisher.sent == []
    assert "capture time of x.tif unknown" in (report.files[0].reason or "")


@dataclass
class Cli:
    """The ``terradapt ingest`` CLI with MinIO and Kafka replaced by an in-memory store and a collector."""

    store: MemoryStore
    publisher: Collect
    env: dict[str, str]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Cli:
    for name in [k for k in os.environ if k.startswith("TERRADAPT_")]:
        monkeypatch.delenv(name)
    store, publisher = MemoryStore(), Collect()
    monkeypatch.setattr("serving.minio_store.minio_client", lambda config: object())
    monkeypatch.setattr("serving.minio_store.MinioStore", lambda client, bucket, create=True: store)
    monkeypatch.setattr(ingest_module.KafkaPublisher, "from_settings", classmethod(lambda cls, k, c: publisher))
    return Cli(store, publisher, {"TERRADAPT_S3__ACCESS_KEY": "a", "TERRADAPT_S3__SECRET_KEY": "b"})


def test_cli_datetime_and_csv_options(tmp_path: Path, cli: Cli):
    publisher, env = cli.publisher, cli.env
    first, second = _tile(tmp_path / "IMG_1.tif", 1), _tile(tmp_path / "IMG_2.tif", 2)
    runner = CliRunner(env={"COLUMNS": "250"})
    result = runner.invoke(
        app, ["ingest", str(first), "--region", "D033", "--datetime", "2021-06-14T10:22:00"], env=env
    )
    assert result.exit_code == 0, result.output
    table = tmp_path / "times.csv"
    table.write_text("IMG_2.tif,2022-03-01T08:00:00Z\n")
    result = runner.invoke(app, ["ingest", str(second), "--region", "D033", "--datetimes", str(table)], env=env)
    assert result.exit_code == 0, result.output
    assert [a.datetime for a in publisher.sent] == [WHEN, datetime(2022, 3, 1, 8, tzinfo=UTC)]
    bad = runner.invoke(app, ["ingest", str(first), "--region", "D033", "--datetime", "soon"], env=env)
    assert bad.exit_code != 0 and "accepted: ISO 8601" in bad.output


def test_cli_refuses_undated_files_unless_a_campaign_bounds_them_or_allow_undated(tmp_path: Path, cli: Cli):
    store, publisher, env = cli.store, cli.publisher, cli.env
    undated = _tile(tmp_path / "u.tif", 5)
    runner = CliRunner(env={"COLUMNS": "250"})

    refused = runner.invoke(app, ["ingest", str(undated), "--region", "D033"], env=env)
    assert refused.exit_code == 1 and "capture time of u.tif unknown" in refused.output
    assert publisher.sent == [] and store.list("") == []

    campaign = ["--campaign-start", "2021-04-01", "--campaign-end", "2021-09-30"]
    bounded = runner.invoke(app, ["ingest", str(undated), "--region", "D033", *campaign], env=env)
    assert bounded.exit_code == 0, bounded.output
    item = json.loads(publisher.sent[-1].to_json())
    assert item["properties"]["datetime"] is None
    assert item["properties"]["start_datetime"].startswith("2021-04-01")

    allowed = runner.invoke(app, ["ingest", str(undated), "--region", "D033", "--allow-undated"], env=env)
    assert allowed.exit_code == 0 and "published undated" in allowed.output
    assert len(publisher.sent) == 2
