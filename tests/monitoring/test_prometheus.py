"""Prometheus configuration, alert rules and the Grafana dashboard, checked statically and against a real server.

The live test starts the Debian ``prometheus`` binary on a free loopback port with the shipped configuration and
rules, scraping a real terradapt process (``tests/fakes/metrics_exporter.py``: the embedded pipeline on a tiny
configuration, exporting ``ServiceMetrics``), then runs every PromQL expression of the Grafana dashboard and of
``alerts.yml`` and requires each to return data. An expression that returns nothing on a live pipeline is a panel
that stays empty or an alert that can never fire (a typo in a metric or label name, a label that is never set).
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import ServiceMetrics
from terradapt.records import RolloutEvent, RolloutStep

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "terradapt.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

#: What Grafana substitutes before sending a query (values that make sense for a 2 s scrape interval).
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "10m", "$__interval": "10s", "$region": ".*"}
#: A comparison with a number: the filtering part of an alert expression (``> 0.05``, ``>= 3``, ``== 0``).
COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])")
#: A metric selector: a terradapt metric, a recording rule (level:metric:operation) or ``up``, with its matchers.
SELECTOR = re.compile(r"(?<![\w:])((?:[a-z_]+:)?terradapt_[a-z0-9_]+(?::[a-z0-9_]+)?|up)(?![\w(:])(\{[^}]*\})?")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and annotation of the Grafana dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    return out


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def rule_exprs() -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for r in rules()]


def grafana(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def strip_comparisons(expr: str) -> str:
    """The expression without its comparisons to numbers: what the alert (or filtered panel) measures."""
    return COMPARISON.sub("", expr)


def selectors(expr: str) -> list[str]:
    return [name + (matchers or "") for name, matchers in SELECTOR.findall(expr)]


def queries_without_data(prom: "Prom", timeout_s: float) -> dict[str, str]:
    """Every dashboard and rule expression, as Grafana or the rule evaluator sends it, and every selector inside
    it, polled until all return data or ``timeout_s`` passes; returns those still empty (description -> query).

    Comparisons are stripped for alerts and filtered panels: firing is not the question, having data to compare is.
    """
    queries: dict[str, str] = {}
    for where, expr in dashboard_exprs() + rule_exprs():
        expr = grafana(expr)
        prom.query(expr)  # valid PromQL as written
        queries[f"{where}: {strip_comparisons(expr)}"] = strip_comparisons(expr)
        for sel in selectors(expr):
            queries[f"{where}: selector {sel}"] = sel
    missing = dict(queries)
    deadline = time.monotonic() + timeout_s
    while missing and time.monotonic() < deadline:
        for key, expr in list(missing.items()):
            if prom.query(expr):
                del missing[key]
        if missing:
            time.sleep(1)
    return missing


def exercised_registry() -> CollectorRegistry:
    """A registry where every ServiceMetrics method was called once (so every sample name exists)."""
    registry = CollectorRegistry()
    m = ServiceMetrics(registry)
    m.observe_tile("D013", 0.1)
    m.observe_stage("predict", 0.05)
    m.observe_dead_letter("corrupt_tile")
    m.observe_prediction("D013", 0, 0.7)
    m.observe_drift(
        "D013",
        {"radiometry": 2.0},
        {"radiometry": 1.0},
        ("radiometry",),
        newly_detected=True,
        acquired=datetime(2021, 6, 14, tzinfo=UTC),
    )
    m.observe_adaptation("D013", "bn", "accepted", 2.0)
    m.observe_rollout(RolloutEvent(region="D013", version=1, step=RolloutStep.PROMOTED, previous=0))
    m.observe_label("D013", "joined")
    m.observe_accuracy("D013", 1, 0.8, 0.6, 5)
    return registry


# -- static checks -----------------------------------------------------------------------------------------
def test_promtool_accepts_config_and_rules():
    assert PROMTOOL is not None, "promtool is not on PATH"
    for args in (
        ["check", "config", str(PROM_DIR / "prometheus.yml")],
        ["check", "rules", str(PROM_DIR / "alerts.yml")],
    ):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_queried_metric_is_exported():
    exported = {s.name for fam in exercised_registry().collect() for s in fam.samples}
    recorded = {r["record"] for r in rules() if "record" in r}
    for where, expr in dashboard_exprs() + rule_exprs():
        for selector in selectors(expr):
            name = selector.split("{")[0]
            assert name in exported | recorded | {"up"}, f"{where}: {name} is neither exported nor recorded"
        assert "acquisition_id" not in expr and "tile_id" not in expr, where


def test_alerts_cover_the_failure_modes():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {
        "TerradaptSustainedDrift",
        "TerradaptAccuracyDropAfterRollout",
        "TerradaptAdaptationFailing",
        "TerradaptDeadLettersGrowing",
        "TerradaptWorkerDown",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_grafana_provisioning_matches_the_dashboard():
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "terradapt.yaml").read_text())
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "terradapt.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["type"] == "prometheus" and "127.0.0.1" in ds["datasources"][0]["url"]
    assert providers["providers"][0]["type"] == "file"
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"] and all(t["expr"] and t["datasource"]["uid"] == uid for t in p["targets"]), p["title"]
    region = next(v for v in dash["templating"]["list"] if v["name"] == "region")
    assert region["datasource"]["uid"] == uid and region["includeAll"] and region["multi"]
    assert "Rollouts" in {a["name"] for a in dash["annotations"]["list"]}
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("drift", "miou", "accuracy", "latency", "dead letters", "tiles per second", "version"):
        assert topic in titles, topic


def test_comparison_stripping():
    alert = "(a - b) > 0.05 and on (region) sum(increase(c[6h])) > 0"
    assert strip_comparisons(alert) == "(a - b) and on (region) sum(increase(c[6h]))"
    assert strip_comparisons("x / (y > 0)") == "x / (y)"
    assert strip_comparisons('up{job="terradapt"} == 0') == 'up{job="terradapt"}'
    assert strip_comparisons('m{version!="0"} >= 5') == 'm{version!="0"}'
    assert strip_comparisons("histogram_quantile(0.95, rate(h[30s]))") == "histogram_quantile(0.95, rate(h[30s]))"
    assert selectors('max by (region) (a:terradapt_x:ratio * on (region) terradapt_y{region=~".*"})') == [
        "a:terradapt_x:ratio",
        'terradapt_y{region=~".*"}',
    ]


# -- live Prometheus ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, proc=None, log: Path | None = None, detail=None) -> T:
    """Poll ``check`` until it returns a truthy value; fail with the process log on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail(log) if log else ''}")
        value: T | None
        try:
            value = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not done after {timeout:.0f} s\n{detail() if detail else ''}\n{tail(log) if log else ''}")


def start(processes: list[subprocess.Popen[bytes]], cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.DEVNULL)
    processes.append(proc)
    return proc


class Prom:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)

    def get(self, path: str, **params) -> dict[str, Any]:
        r = self.client.get(path, params=params)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        data: dict[str, Any] = body["data"]
        return data

    def query(self, expr: str) -> list[Any]:
        data = self.get("/api/v1/query", query=expr)
        return [data["result"]] if data["resultType"] in ("scalar", "string") else data["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


@pytest.mark.services
def test_every_dashboard_and_alert_query_has_data_on_a_real_pipeline(tmp_path, processes):
    t0 = time.monotonic()
    exporter_dir = tmp_path / "exporter"
    exporter_log = tmp_path / "exporter.log"
    exporter = start(
        processes,
        [sys.executable, str(ROOT / "tests" / "fakes" / "metrics_exporter.py"), "--root", str(exporter_dir)],
        exporter_log,
    )
    info = wait_for(
        lambda: json.loads((exporter_dir / "exporter.json").read_text()),
        120,
        "exporter serving /metrics",
        exporter,
        exporter_log,
    )

    prom_dir = tmp_path / "prometheus"
    (prom_dir / "targets").mkdir(parents=True)
    shutil.copy(PROM_DIR / "prometheus.yml", prom_dir)
    shutil.copy(PROM_DIR / "alerts.yml", prom_dir)
    (prom_dir / "targets" / "test.json").write_text(
        json.dumps([{"targets": [f"127.0.0.1:{info['port']}"], "labels": {"runner": "test"}}])
    )
    port = free_port()
    assert PROMETHEUS is not None, "prometheus is not on PATH"
    prom_log = tmp_path / "prometheus.log"
    prometheus = start(
        processes,
        [
            PROMETHEUS,
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        prom_log,
    )
    prom = Prom(f"http://127.0.0.1:{port}")
    wait_for(lambda: prom.client.get("/-/ready").status_code == 200, 30, "prometheus ready", prometheus, prom_log)

    def target_up() -> bool:
        targets = prom.get("/api/v1/targets")["activeTargets"]
        return any(t["labels"]["job"] == "terradapt" and t["health"] == "up" for t in targets)

    wait_for(target_up, 60, "terradapt target up", prometheus, prom_log)
    summary = wait_for(
        lambda: json.loads((exporter_dir / "done.json").read_text()),
        300,
        "embedded pipeline run",
        exporter,
        exporter_log,
    )
    assert summary["rollouts"] and summary["dead_letters"] == ["corrupt_tile"] and summary["joined"] > 0

    # Every expression, as Grafana or the rule evaluator would send it (comparisons stripped for alerts and
    # filtered panels: firing is not the question, having data to compare is), and every selector inside it.
    missing = queries_without_data(prom, timeout_s=90)
    assert not missing, "queries without data:\n" + "\n".join(missing)

    regions = prom.get("/api/v1/label/region/values", **{"match[]": "terradapt_tiles_processed_total"})
    assert set(summary["tiles_by_region"]) <= set(regions)  # the dashboard's $region variable

    def rules_evaluated() -> bool:
        got = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
        errors = [(r["name"], r.get("lastError")) for r in got if r["health"] == "err"]
        assert not errors, errors
        return len(got) == len(rules()) and all(r["health"] == "ok" for r in got)

    wait_for(rules_evaluated, 30, "every rule evaluated without error")

    # The numbers went through unchanged: pipeline -> ServiceMetrics -> scrape -> PromQL (polled: the last
    # labels were joined after the stream ended, and the next scrape may not have happened yet).
    promoted = [r for r in summary["rollouts"] if r[2] == "promoted"]
    expected = {
        'sum(terradapt_tiles_processed_total{outcome="ok"})': summary["tiles"],
        'sum(terradapt_tiles_processed_total{outcome="dead_letter"})': 1,
        'sum(terradapt_dead_letters_total{reason="corrupt_tile"})': 1,
        'sum(terradapt_rollout_events_total{step="promoted"})': len(promoted),
        "sum(terradapt_adaptation_runs_total)": len(summary["adaptations"]),
        "count(terradapt_model_info)": len(summary["tiles_by_region"]),
        'sum(terradapt_labelled_tiles_total{outcome="joined"})': summary["joined"],
    }
    expected |= {f'terradapt_model_current_version{{region="{r}"}}': v for r, v, _ in promoted}

    got: dict[str, float] = {}

    def values_match() -> bool:
        got.update({expr: prom.value(expr) for expr in expected})
        return got == {k: float(v) for k, v in expected.items()}

    wait_for(values_match, 20, "exported values equal the run's", detail=lambda: f"expected {expected}, got {got}")
    assert exporter.poll() is None and prometheus.poll() is None

    # The run's dashboard state renders, with the promoted regions on the map.
    from monitoring.dashboard import create_app

    page = create_app(exporter_dir / "state.json").handle("GET", "/").body.decode()
    for region, _, _ in promoted:
        assert f'data-region="{region}"' in page
    print(
        f"live Prometheus test: every dashboard and rule query had data in {time.monotonic() - t0:.0f} s "
        f"(pipeline run {summary['seconds']} s)"
    )
