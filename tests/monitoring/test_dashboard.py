"""The built-in dashboard: state from a run, the departement map coloured by drift, the server, a real browser."""

import math
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from monitoring.dashboard import (
    DRIFT_SCALE,
    GEOJSON_ENV,
    NOT_MONITORED,
    TIMELINE_POINTS,
    DashboardState,
    create_app,
    dashboard_state,
    default_geojson_path,
    drift_colour,
    insee_to_region,
    read_state,
    region_to_insee,
    serve,
    write_state,
)
from stream.embedded import RunResult, TileLog
from stream.report import RegionRow
from terradapt.records import DeadLetter, DriftEvent, ModelVersion, RolloutEvent, RolloutStep

ROOT = Path(__file__).resolve().parents[2]
GEOJSON = default_geojson_path()
SIGNALS = ("radiometry", "deep", "batchnorm", "prediction")
K = 13


def _ratio_curve(region: str, n: int) -> list[float]:
    """Drift ratio per tile: flat noise, or a shift at tile 10 (cleared by a rollout at 18 for adapted regions)."""
    rng = np.random.default_rng(abs(hash(region)) % 2**32)
    noise = 0.25 + 0.15 * rng.random(n)
    if region == "D013":
        return [x if i < 9 else (x + 0.6 * (i - 8) if i < 17 else x * 0.6) for i, x in enumerate(noise)]
    if region == "D029":
        return [x if i < 12 else 1.2 + 0.05 * (i - 12) for i, x in enumerate(noise)]
    return list(noise)


def make_run(n: int = 30) -> tuple[RunResult, list[RegionRow]]:
    """A run shaped like the demo's: D033 calm, D013 drifts then is adapted (v1), D029 label shift, dubai-3."""
    result = RunResult()
    for region in ("D033", "D013", "D029", "dubai-3"):
        for i, ratio in enumerate(_ratio_curve(region, n), start=1):
            version = 1 if region == "D013" and i >= 18 else 0
            fired = ("radiometry",) if ratio >= 1 else ()
            scores = {s: ratio * 10 for s in SIGNALS}
            p_value = 1e-6 if ratio >= 1 else 0.5
            result.tiles.append(
                TileLog(
                    region, i, f"{region}-{i:05d}", version, ratio, scores, dict.fromkeys(SIGNALS, 10.0), fired, p_value
                )
            )
            if fired and region not in result.first_detection:
                result.first_detection[region] = i
                result.drift_events.append(
                    DriftEvent(
                        region=region,
                        acquisition_id=f"{region}-{i:05d}",
                        tiles_seen=i,
                        signal="radiometry",
                        score=ratio * 10,
                        threshold=10.0,
                    )
                )
    v1 = ModelVersion(region="D013", version=1, parent=0, method="bn", sha256="0" * 64, href="file:///v1")
    rejected = ModelVersion(
        region="D029",
        version=1,
        parent=0,
        method="tent",
        sha256="1" * 64,
        href="file:///r",
        accepted=False,
        gate_reasons=("class collapse",),
    )
    result.adaptations += [v1, rejected]
    result.rollouts.append(RolloutEvent(region="D013", version=1, step=RolloutStep.PROMOTED, previous=0))
    result.dead_letters += [
        DeadLetter(topic="acquisitions", reason=r, error="x", payload="{}") for r in ("corrupt_tile",) * 2
    ]
    rng = np.random.default_rng(0)
    for (region, version), acc in {("D013", 0): 0.55, ("D013", 1): 0.8, ("D033", 0): 0.85, ("D029", 0): 0.6}.items():
        cm = rng.integers(0, 40, (K, K)).astype(np.int64)
        np.fill_diagonal(cm, 0)
        np.fill_diagonal(cm, int(cm.sum() * acc / (1 - acc) / K))
        result.confusion[(region, version)] = cm
    rows = [
        RegionRow("D033", "none (source departement)", n, None, "-", 0, "-", 0.61, 0.61),
        RegionRow("D013", "radiometric: gain/offset + haze", n, 10, "radiometry", 1, "accepted", 0.32, 0.55),
        RegionRow("D029", "label shift only", n, 13, "radiometry", 0, "rejected", 0.5, 0.5),
    ]
    return result, rows


@pytest.fixture
def state_file(tmp_path):
    result, rows = make_run()
    return write_state(dashboard_state(result, rows=rows, title="terradapt test"), tmp_path / "report" / "state.json")


def test_region_codes_map_to_insee_codes():
    assert region_to_insee("D033") == "33"
    assert region_to_insee("D001") == "01"
    assert region_to_insee("D02A") == "2A" and region_to_insee("D02B") == "2B"
    assert region_to_insee("dubai-3") is None and region_to_insee("D0333") is None
    assert insee_to_region("2A") == "D02A" and insee_to_region("33") == "D033"
    with pytest.raises(ValueError, match=re.escape("'01'..'95', '2A', '2B'")):
        insee_to_region("971")


def test_drift_colour_scale():
    assert drift_colour(None) == drift_colour(float("nan")) == NOT_MONITORED
    assert drift_colour(0.1) == DRIFT_SCALE[0][1]
    assert drift_colour(0.99) == DRIFT_SCALE[2][1]
    assert drift_colour(1.0) == DRIFT_SCALE[3][1]  # at threshold = alarm
    assert drift_colour(1e9) == DRIFT_SCALE[-1][1]


def test_state_summarises_the_run():
    result, rows = make_run()
    state = dashboard_state(result, rows=rows)
    d013, d033, d029 = state.regions["D013"], state.regions["D033"], state.regions["D029"]
    assert set(state.regions) == {"D013", "D029", "D033", "dubai-3"}
    assert d013.current_version == 1 and d033.current_version == 0
    assert d013.rollouts[0].index == 18 and d013.rollouts[0].step == "promoted"
    assert d013.first_detection == result.first_detection["D013"]
    assert d013.drift_ratio == pytest.approx([t for t in result.tiles if t.region == "D013"][-1].score_ratio)
    assert d029.drift_detected and d029.fired == ("radiometry",)
    assert not d029.adaptations[0].accepted and d029.adaptations[0].reasons == ("class collapse",)
    assert [a.version for a in d013.accuracy] == [0, 1]
    assert d013.accuracy[1].accuracy > d013.accuracy[0].accuracy
    assert d013.held_out_miou == {"source": 0.32, "current": 0.55}
    assert state.dead_letters == {"corrupt_tile": 2}
    assert d013.signals["radiometry"].threshold == 10.0

    class Registry:  # the model registry, when given, is the truth about what is served
        def current(self, region):
            return 7 if region == "D013" else 0

    assert dashboard_state(result, Registry()).regions["D013"].current_version == 7


def test_timeline_is_bounded():
    result, _ = make_run(n=TIMELINE_POINTS + 50)
    state = dashboard_state(result)
    assert len(state.regions["D033"].timeline) == TIMELINE_POINTS
    assert state.regions["D033"].timeline[-1].index == TIMELINE_POINTS + 50


def test_state_file_round_trip_and_errors(tmp_path, state_file):
    state = read_state(state_file)
    assert isinstance(state, DashboardState) and "D013" in state.regions
    assert [p.name for p in state_file.parent.iterdir()] == ["state.json"]  # atomic write left no temp file
    assert read_state(tmp_path / "missing.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"regions": {"D013": {"tiles": "many"}}}')
    with pytest.raises(ValueError, match=r"bad\.json is not a dashboard state file"):
        read_state(bad)
    newer = tmp_path / "newer.json"
    newer.write_text('{"schema_version": 99}')
    with pytest.raises(ValueError, match="schema_version=99"):
        read_state(newer)


def _paths(page: str) -> dict[str, dict[str, str]]:
    out = {}
    for tag in re.findall(r"<path [^>]*>", page):
        attrs = dict(re.findall(r'([a-z-]+)="([^"]*)"', tag))
        out[attrs["data-code"]] = attrs
    return out


def test_page_colours_departements_by_drift(state_file):
    app = create_app(state_file)
    r = app.handle("GET", "/")
    assert r.status == 200 and r.content_type.startswith("text/html")
    assert dict(r.headers)["Content-Security-Policy"].startswith("default-src 'none'")
    page = r.body.decode()
    paths = _paths(page)
    assert len(paths) == 96  # every metropolitan departement, Corsica included
    assert {"2A", "2B"} <= set(paths)
    state = read_state(state_file)
    assert state is not None
    for region in ("D013", "D033", "D029"):
        code = region_to_insee(region)
        assert code is not None
        assert paths[code]["data-region"] == region
        assert paths[code]["fill"] == drift_colour(state.regions[region].drift_ratio)
    assert paths["29"]["fill"] in {DRIFT_SCALE[3][1], DRIFT_SCALE[4][1]}  # D029 is in drift now
    assert "alarm" in paths["29"]["class"]
    assert paths["33"]["fill"] in {DRIFT_SCALE[0][1], DRIFT_SCALE[1][1]}  # D033 is calm
    assert paths["75"]["fill"] == NOT_MONITORED and "data-region" not in paths["75"]
    assert "Bouches-du-Rh" in page and "dubai-3" in page  # names from the GeoJSON; off-map regions listed
    assert page.count('<svg class="timeline"') == 4
    assert "class collapse" in page and "corrupt_tile" in page
    assert "IGN GEOFLA, INSEE, via france-geojson" in page
    assert "http://" not in page.replace("http://www.w3.org", "")  # nothing loaded from elsewhere


def test_routes(state_file):
    app = create_app(state_file)
    assert app.handle("GET", "/api/state").status == 200
    assert DashboardState.model_validate_json(app.handle("GET", "/api/state").body).title == "terradapt test"
    assert app.handle("GET", "/static/dashboard.css").content_type.startswith("text/css")
    assert app.handle("GET", "/static/dashboard.js").status == 200
    assert app.handle("GET", "/static/../dashboard.py").status == 404
    assert app.handle("GET", "/static/%2e%2e/dashboard.py").status == 404
    assert app.handle("GET", "/nope").status == 404
    assert app.handle("POST", "/").status == 405
    assert app.handle("GET", "/healthz").body == b"ok\n"


def test_missing_state_and_missing_map_still_render(tmp_path, monkeypatch):
    monkeypatch.setenv(GEOJSON_ENV, str(tmp_path / "nowhere.geojson"))
    app = create_app(tmp_path / "state.json")
    page = app.handle("GET", "/").body.decode()
    assert "No state file yet" in page and "No departement boundaries" in page
    assert app.handle("GET", "/api/state").status == 404


def test_geojson_override_and_escaping(tmp_path, monkeypatch):
    square = [[[0.0, 45.0], [1.0, 45.0], [1.0, 46.0], [0.0, 46.0], [0.0, 45.0]]]
    features = [
        {
            "type": "Feature",
            "properties": {"code": c, "nom": f"<b>{c}</b>"},
            "geometry": {"type": "Polygon", "coordinates": [[[x + i, y] for x, y in square[0]]]},
        }
        for i, c in enumerate(("13", "33"))
    ]
    geo = tmp_path / "deps.geojson"
    geo.write_text(__import__("json").dumps({"type": "FeatureCollection", "features": features}))
    monkeypatch.setenv(GEOJSON_ENV, str(geo))
    result, rows = make_run()
    state = dashboard_state(result, rows=rows, title="<script>alert(1)</script>")
    path = write_state(state, tmp_path / "state.json")
    page = create_app(path).handle("GET", "/").body.decode()
    assert len(_paths(page)) == 2
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    assert "<b>13</b>" not in page


def test_server_on_loopback_rereads_the_state(tmp_path, state_file):
    app = create_app(state_file)
    server = serve(app, port=0)
    try:
        assert server.host == "127.0.0.1"
        r = httpx.get(server.url, timeout=10)
        assert r.status_code == 200 and "no-store" in r.headers["cache-control"]
        assert 'data-region="D013"' in r.text
        stamp = httpx.get(server.url + "api/stamp", timeout=10).json()["stamp"]
        result, _ = make_run()
        result.tiles = [t for t in result.tiles if t.region != "D013"]
        result.rollouts, result.adaptations = [], []
        result.confusion = {k: v for k, v in result.confusion.items() if k[0] != "D013"}
        write_state(dashboard_state(result), state_file)
        os.utime(state_file, ns=(1, 1))  # a different stamp even within the file system's time resolution
        assert httpx.get(server.url + "api/stamp", timeout=10).json()["stamp"] != stamp
        assert 'data-region="D013"' not in httpx.get(server.url, timeout=10).text
    finally:
        server.stop()


# -- headless browser ------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def screenshot(url: str, out: Path, profile: Path, size: tuple[int, int] = (1400, 1500)) -> Path:
    assert CHROMIUM is not None, "chromium is not on PATH"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={out}",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.exists(), done.stderr[-2000:]
    return out


def assert_looks_like_the_dashboard(png: Path) -> None:
    import matplotlib.image

    assert png.stat().st_size > 30_000
    assert png_size(png) == (1400, 1500)
    img = matplotlib.image.imread(png)[..., :3]
    assert img.std() > 0.05  # not a blank page
    colours = {tuple(np.round(c * 255).astype(int)) for c in img.reshape(-1, 3)[::7]}

    def present(hex_colour: str) -> bool:
        rgb = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
        return any(math.dist(rgb, c) < 6 for c in colours)

    assert present(NOT_MONITORED)  # the map was drawn
    assert sum(present(c) for _, c, _ in DRIFT_SCALE) >= 2  # with drift colours


def test_screenshot_in_headless_chromium(tmp_path, state_file):
    server = serve(create_app(state_file), port=0)
    try:
        png = screenshot(server.url, tmp_path / "dashboard.png", tmp_path / "chromium-profile")
    finally:
        server.stop()
    assert_looks_like_the_dashboard(png)


@pytest.mark.docs
def test_docs_screenshot_of_a_real_demo_run(tmp_path, monkeypatch):
    """docs/dashboard.png: the dashboard of a real (quick) embedded demo run, for the README."""
    from stream.config import DemoConfig, Settings
    from stream.demo import run_demo

    monkeypatch.chdir(tmp_path)  # the page shows the state path as given: report/state.json, as after `make demo`

    cfg = DemoConfig(
        workdir=tmp_path / "work",
        cache_dir=tmp_path / "cache",
        report_dir=tmp_path / "report",
        tile_size=128,
        train_tiles=12,
        calibration_tiles=24,
        stream_tiles=24,
        eval_tiles=4,
        train_steps=120,
    )
    demo = run_demo(Settings.model_validate({"demo": cfg}))
    state = write_state(dashboard_state(demo.run, rows=demo.rows, title="terradapt demo"), Path("report/state.json"))
    server = serve(create_app(state), port=0)
    try:
        png = screenshot(server.url, tmp_path / "dashboard.png", tmp_path / "chromium-profile")
    finally:
        server.stop()
    assert_looks_like_the_dashboard(png)
    (ROOT / "docs").mkdir(exist_ok=True)
    shutil.copyfile(png, ROOT / "docs" / "dashboard.png")


def test_cross_region_review_flags_regions_by_benjamini_hochberg(tmp_path):
    """The dashboard's daily look across regions: BH over every region's latest p-value."""
    from monitoring.fdr import FDRConfig

    result, rows = make_run()
    state = dashboard_state(result, rows=rows)
    last = {r: [t for t in result.tiles if t.region == r][-1] for r in ("D033", "D013", "D029", "dubai-3")}
    drifting = {r for r, t in last.items() if t.p_value < 0.01}
    assert drifting == {"D029"}  # D013 was repaired by its rollout; D029's label shift is still on
    assert set(state.fdr_flagged) == drifting and state.fdr_q == 0.05
    assert state.regions["D029"].fdr_flagged and not state.regions["D033"].fdr_flagged
    assert state.regions["D029"].p_value == pytest.approx(1e-6)
    assert dashboard_state(result, fdr=FDRConfig(q=1e-9)).fdr_flagged == ()
    html = create_app(write_state(state, tmp_path / "s.json"), GEOJSON).handle("GET", "/").body.decode()
    assert "flagged at FDR 0.05" in html and "<b>flagged</b>" in html
