"""``terradapt demo --task crops --quick``: the whole crop loop from the command line, tiny and seeded (~10 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from monitoring.dashboard import read_state, render_page
from stream.cli import app

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture
def crop_env(env, tmp_path: Path) -> dict[str, str]:
    """Demo files under tmp_path, every other setting at its default."""
    variables = {
        "CROPS__DEMO__WORKDIR": str(tmp_path / "work"),
        "CROPS__DEMO__REPORT_DIR": str(tmp_path / "report"),
    }
    env(**variables)  # clears any TERRADAPT_* of the caller, sets these
    return variables


def test_demo_task_crops_quick(crop_env: dict[str, str], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    result = runner.invoke(app, ["demo", "--task", "crops", "--quick"])
    assert result.exit_code == 0, result.output
    assert "fr-2" in result.output and "lv-1" in result.output and "dead letters: 2" in result.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    rows = {r["region"]: r for r in summary["rows"]}
    assert rows["fr-2"]["versions"] == [] and rows["fr-2"]["final_version"] == 0
    assert rows["lv-1"]["drift_at"] is not None and rows["lv-1"]["versions"]
    assert rows["lv-1"]["oa_system"] > rows["lv-1"]["oa_source"] + 0.05
    assert {d["reason"] for d in summary["dead_letters"]} == {"invalid_series"}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| lv-1 |" in report and "OA system" in report
    # the dashboard's state file: the countries on the country map, lv-1 drifting and served by its new version
    state = read_state(tmp_path / "report" / "state.json")
    assert state is not None and set(state.regions) == {"fr-2", "lv-1"}
    lv = state.regions["lv-1"]
    assert lv.first_detection == rows["lv-1"]["drift_at"] and lv.current_version == rows["lv-1"]["final_version"]
    assert [a.accepted for a in lv.adaptations if a.version == lv.current_version] == [True]
    assert state.regions["fr-2"].first_detection is None and len(state.regions["fr-2"].timeline) == 160
    page = render_page(state, None, state_path=Path("state.json"))
    assert 'data-country="LV" data-regions="lv-1"' in page and 'data-country="FR" data-regions="fr-2"' in page
    assert "Drift now, by country" in page and "by departement" not in page


def test_demo_task_is_checked(crop_env: dict[str, str]) -> None:
    result = runner.invoke(app, ["demo", "--task", "maps"])
    assert result.exit_code != 0 and "segmentation, crops" in result.output
    result = runner.invoke(app, ["demo", "--task", "crops", "--dataset", "dubai"])
    assert result.exit_code != 0


def test_default_task_is_still_the_segmentation_demo(crop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    class ReachedError(Exception):
        pass

    def fake_run_demo(*args: object, **kwargs: object) -> None:
        raise ReachedError

    monkeypatch.setattr("stream.demo.run_demo", fake_run_demo)
    result = runner.invoke(app, ["demo", "--quick"])
    assert isinstance(result.exception, ReachedError)
