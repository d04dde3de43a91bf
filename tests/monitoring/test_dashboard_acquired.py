"""The dashboard plots drift against acquisition (capture) time as well as tile order."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from monitoring.dashboard import create_app, dashboard_state, write_state
from monitoring.dashboard.render import render_timeline
from tests.monitoring.test_dashboard import make_run

FIRST = datetime(2021, 4, 1, tzinfo=UTC)


def _dated_run():
    result, rows = make_run()
    for tile in result.tiles:
        # tiles arrive in index order but were captured in reverse order; every fifth one has no capture time
        tile.acquired = None if tile.index % 5 == 0 else FIRST + timedelta(days=60 - tile.index)
    return result, rows


def _xs(svg: str) -> list[float]:
    points = re.search(r'<polyline points="([^"]+)"', svg)
    assert points is not None
    return [float(p.split(",")[0]) for p in points.group(1).split()]


def test_state_keeps_the_capture_time_of_each_point():
    result, rows = _dated_run()
    timeline = dashboard_state(result, rows=rows).regions["D033"].timeline
    assert timeline[0].acquired == FIRST + timedelta(days=59) and timeline[4].acquired is None


def test_timeline_against_acquisition_time_orders_by_capture_and_skips_undated_tiles():
    result, rows = _dated_run()
    region = dashboard_state(result, rows=rows).regions["D013"]
    by_order, by_time = render_timeline(region), render_timeline(region, by_time=True)
    assert len(_xs(by_order)) == len(region.timeline)
    assert len(_xs(by_time)) == sum(p.acquired is not None for p in region.timeline)
    assert _xs(by_time) == sorted(_xs(by_time))
    assert "2021-04-01" not in by_order and "2021-05-" in by_time  # date ticks only on the time axis
    undated = region.model_copy(  # a run that knew no capture time
        update={"timeline": [p.model_copy(update={"acquired": None}) for p in region.timeline]}
    )
    assert "no dated tiles yet" in render_timeline(undated, by_time=True)


def test_page_switches_the_x_axis(tmp_path):
    result, rows = _dated_run()
    path = write_state(dashboard_state(result, rows=rows, title="t"), tmp_path / "state.json")
    app = create_app(path)
    assert b"<b>tile order</b>" in app.handle("GET", "/").body
    page = app.handle("GET", "/?x=acquired").body
    assert b"<b>acquisition time</b>" in page and b"2021-0" in page
