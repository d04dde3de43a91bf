"""The dashboard's HTTP side: routes (:class:`DashboardApp`, testable without a socket) and a loopback server.

The server is the standard library's threaded HTTP server bound to loopback: a read-only page for one operator
needs no framework, and the import stays out of ``import monitoring``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from monitoring.dashboard.render import DepartementMap, default_geojson_path, render_page
from monitoring.dashboard.state import DashboardState, read_state

STATIC_DIR: Final = Path(__file__).resolve().parents[1] / "dashboard_static"


# -- app + server ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    """What the app answers to one request."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC_TYPES: Final = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class DashboardApp:
    """Routes of the dashboard, independent of the HTTP server (tests call :meth:`handle` directly).

    Args:
        state_path: The state file to show (read again whenever it changes).
        geojson_path: Departement boundaries; default :func:`default_geojson_path`.

    """

    def __init__(self, state_path: Path, geojson_path: Path | None = None) -> None:
        self.state_path = Path(state_path)
        self.geojson_path = Path(geojson_path) if geojson_path else default_geojson_path()
        self._map: DepartementMap | None = None
        self.map_problem: str | None = None
        try:
            self._map = DepartementMap.load(self.geojson_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.map_problem = f"cannot read {self.geojson_path}: {exc}"
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int] | None, DashboardState | None, str | None] | None = None

    @property
    def departements(self) -> DepartementMap | None:
        """The projected boundaries (None when the GeoJSON could not be read)."""
        return self._map

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.state_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> tuple[DashboardState | None, str | None]:
        """The current state and the error that prevented reading it, re-read only when the file changed."""
        stamp = self._stamp()
        with self._lock:
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1], self._cache[2]
            try:
                state, error = read_state(self.state_path), None
            except (ValueError, OSError) as exc:
                state, error = None, str(exc)
            self._cache = (stamp, state, error)
            return state, error

    def handle(self, method: str, path: str) -> Response:
        """Answer one request (GET/HEAD only: the dashboard is read-only)."""
        if method not in ("GET", "HEAD"):
            return Response(
                405, "text/plain; charset=utf-8", b"read-only dashboard: GET only\n", (("Allow", "GET, HEAD"),)
            )
        route = path.split("?", 1)[0]
        if route == "/":
            state, error = self.load()
            page = render_page(
                state,
                self._map,
                state_path=self.state_path,
                error=error,
                map_problem=self.map_problem,
                by_time="x=acquired" in path.partition("?")[2].split("&"),
            )
            return Response(200, "text/html; charset=utf-8", page.encode(), (("Content-Security-Policy", _CSP),))
        if route == "/api/state":
            state, error = self.load()
            if state is None:
                return Response(
                    404 if error is None else 500,
                    "application/json",
                    json.dumps({"error": error or f"no state file at {self.state_path}"}).encode(),
                )
            return Response(200, "application/json", state.model_dump_json().encode())
        if route == "/api/stamp":
            stamp = self._stamp()
            return Response(200, "application/json", json.dumps({"stamp": list(stamp) if stamp else None}).encode())
        if route == "/healthz":
            return Response(200, "text/plain; charset=utf-8", b"ok\n")
        if route.startswith("/static/"):
            name = route.removeprefix("/static/")
            target = STATIC_DIR / name
            if "/" not in name and target.suffix in _STATIC_TYPES and target.is_file():
                return Response(200, _STATIC_TYPES[target.suffix], target.read_bytes())
        return Response(404, "text/plain; charset=utf-8", b"not found\n")


def create_app(state_path: Path, geojson_path: Path | None = None) -> DashboardApp:
    """Build the dashboard for one state file (see :class:`DashboardApp`)."""
    return DashboardApp(state_path, geojson_path)


@dataclass(frozen=True)
class DashboardServer:
    """A running dashboard; ``stop()`` shuts it down."""

    host: str
    port: int
    _server: ThreadingHTTPServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The page's URL."""
        return f"http://{self.host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)


def _handler(app: DashboardApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "terradapt-dashboard"

        def _answer(self, method: str) -> None:
            r = app.handle(method, self.path)
            self.send_response(r.status)
            self.send_header("Content-Type", r.content_type)
            self.send_header("Content-Length", str(len(r.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in r.headers:
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(r.body)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_HEAD(self) -> None:
            self._answer("HEAD")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: a polling page would fill the terminal

    return Handler


def serve(app: DashboardApp, host: str = "127.0.0.1", port: int = 0) -> DashboardServer:
    """Serve ``app`` from a daemon thread (``port=0``: any free port, read back from the handle)."""
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="terradapt-dashboard", daemon=True)
    thread.start()
    return DashboardServer(host, int(server.server_address[1]), server, thread)


def run_dashboard(
    state_path: Path, host: str = "127.0.0.1", port: int = 8765, geojson_path: Path | None = None
) -> None:
    """Serve the dashboard until interrupted (what ``terradapt dashboard`` calls).

    Args:
        state_path: State file to show (e.g. ``report/state.json`` written by the demo).
        host: Bind address; loopback by default, the page has no authentication.
        port: TCP port.
        geojson_path: Departement boundaries; default ``$TERRADAPT_DEPARTEMENTS_GEOJSON`` or the shared data.

    """
    app = create_app(state_path, geojson_path)
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    print(f"terradapt dashboard on http://{host}:{server.server_address[1]}/ (state: {state_path}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
