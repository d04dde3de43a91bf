"""The built-in dashboard (``terradapt dashboard``): one local page showing where and when the models drift.

It needs no Grafana, no CDN and no internet: a map of the French departements coloured by each region's current
drift score (boundaries from the shared GeoJSON, drawn as inline SVG), a tile-grid map of European countries for
crop regions (``lv-1``, ``frh-1``: ``countries``), a drift timeline per region with detections
and rollouts marked, the model version each region serves, accuracy by model version on delayed labels, the
cross-region review (Benjamini-Hochberg over all regions at one look), the adaptation / rollout log and the dead
letters. Rooms:

* ``state`` - the JSON state file a runner writes (:func:`dashboard_state`, :func:`write_state`);
* ``render`` - the page, rendered on the server from the file on every request (``colours``: the drift scale;
  ``countries``: the country map);
* ``server`` - routes and the loopback HTTP server (:func:`create_app`, :func:`serve`, :func:`run_dashboard`).
"""

from monitoring.dashboard.colours import DRIFT_SCALE, NOT_MONITORED, drift_colour
from monitoring.dashboard.countries import EUROPE_GRID, region_country, render_country_map
from monitoring.dashboard.render import DEFAULT_GEOJSON, GEOJSON_ENV, DepartementMap, default_geojson_path, render_page
from monitoring.dashboard.server import DashboardApp, DashboardServer, Response, create_app, run_dashboard, serve
from monitoring.dashboard.state import (
    STATE_SCHEMA_VERSION,
    TIMELINE_POINTS,
    DashboardState,
    RegionState,
    dashboard_state,
    insee_to_region,
    read_state,
    region_to_insee,
    write_state,
)

__all__ = [
    "DEFAULT_GEOJSON",
    "DRIFT_SCALE",
    "EUROPE_GRID",
    "GEOJSON_ENV",
    "NOT_MONITORED",
    "STATE_SCHEMA_VERSION",
    "TIMELINE_POINTS",
    "DashboardApp",
    "DashboardServer",
    "DashboardState",
    "DepartementMap",
    "RegionState",
    "Response",
    "create_app",
    "dashboard_state",
    "default_geojson_path",
    "drift_colour",
    "insee_to_region",
    "read_state",
    "region_country",
    "region_to_insee",
    "render_country_map",
    "render_page",
    "run_dashboard",
    "serve",
    "write_state",
]
