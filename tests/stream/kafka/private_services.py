"""A private Kafka broker and/or MinIO for one test: own run folder, own loopback ports, killable and restartable.

Started with the same ``deploy/local/services.sh`` that ``make test`` uses (its artefacts are already installed), so
a test can SIGKILL a service and restart it on the same data without touching the shared services the rest of the
suite runs on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SERVICES_SH = Path(__file__).resolve().parents[3] / "deploy" / "local" / "services.sh"
#: The client settings (``services.sh env`` prefixes) that point at each service.
_CLIENT_VARS = {"kafka": "TERRADAPT_KAFKA__", "minio": "TERRADAPT_S3__"}
_PORT_VARS = {
    "kafka": ("TERRADAPT_KAFKA_PORT", "TERRADAPT_KAFKA_CONTROLLER_PORT"),
    "minio": ("TERRADAPT_MINIO_PORT", "TERRADAPT_MINIO_CONSOLE_PORT"),
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PrivateServices:
    """Services of one test under ``root`` (``TERRADAPT_RUN_DIR``), on ports of their own.

    ``extra`` adds service-script variables (e.g. ``TERRADAPT_KAFKA_SECURE=1``).
    """

    def __init__(self, root: Path, names: tuple[str, ...] = ("kafka", "minio"), extra: dict[str, str] | None = None):
        self.root = root
        self.names = names
        ports = iter(free_ports(2 * len(names)))
        self.script_env = {"TERRADAPT_RUN_DIR": str(root), **(extra or {})}
        for name in names:
            for var in _PORT_VARS[name]:
                self.script_env[var] = str(next(ports))

    def _run(self, *args: str, timeout: float = 300) -> str:
        env = {**os.environ, **self.script_env}
        done = subprocess.run(
            ["bash", str(SERVICES_SH), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"services.sh {' '.join(args)} failed ({done.returncode}): {done.stderr[-3000:]}")
        return done.stdout

    def up(self, *names: str) -> None:
        """Start (or restart after a kill) and wait until healthy."""
        self._run("up", *(names or self.names))

    def down(self) -> None:
        """Stop every service of this instance."""
        self._run("down", *self.names)

    def pid(self, name: str) -> int:
        """The pid the service script recorded."""
        return int((self.root / f"{name}.pid").read_text().strip())

    def kill(self, name: str) -> None:
        """SIGKILL the service (no clean shutdown) and wait until its ports stop accepting connections."""
        os.kill(self.pid(name), signal.SIGKILL)
        ports = [int(self.script_env[var]) for var in _PORT_VARS[name]]
        deadline = time.monotonic() + 30
        while any(_accepts(port) for port in ports):  # the kernel closes the sockets once every thread has exited
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still listening 30 s after SIGKILL")
            time.sleep(0.1)

    def env(self) -> dict[str, str]:
        """The ``TERRADAPT_*`` client settings of this instance (what ``services.sh env`` prints)."""
        out = {}
        for line in self._run("env").splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                out[key] = value
        return out

    def client_env(self) -> dict[str, str]:
        """Only the client settings of this instance's own services (the others stay on the shared ones)."""
        prefixes = tuple(_CLIENT_VARS[name] for name in self.names)
        return {k: v for k, v in self.env().items() if k.startswith(prefixes)}
