"""A real ``mlflow server`` subprocess for integration tests.

Usage in a test module::

    from tests.integration.mlflow_fixtures import mlflow_server  # noqa: F401  (fixture)

    def test_x(mlflow_server):
        tracker = Tracker(mlflow_server.uri)

or, for a server of your own (e.g. one you kill on purpose)::

    server = start_mlflow_server(tmp_path / "srv")
    try: ...
    finally: server.stop()

The server uses a SQLite backend store and proxied artifacts (``--serve-artifacts
--artifacts-destination``) under the given directory, listens on a free port of
127.0.0.1, runs with one worker and without MLflow's job-execution side processes
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``; they spawn ~8 huey processes), and is
ready once ``GET /health`` answers ``OK``. ``stop()`` terminates its whole process
group (the ``mlflow server`` CLI forks uvicorn).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = float(os.environ.get("ORPO_RAY_MLFLOW_STARTUP_TIMEOUT", "120"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server_command(root: Path, port: int) -> list[str]:
    root = Path(root).resolve()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    prog = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    return [
        *prog,
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "mlartifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


@dataclass
class MlflowServer:
    uri: str
    port: int
    root: Path
    log_path: Path
    proc: subprocess.Popen
    startup_s: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def kill(self) -> None:
        """Simulate a crash: SIGKILL the whole process group, no clean shutdown."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._stopped = True

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        if self._stopped:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # uvicorn children may outlive the CLI process: always sweep the group.
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self._stopped = True

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session=True: pgid == pid
        except ProcessLookupError:
            pass


def start_mlflow_server(root: Path, port: int | None = None) -> MlflowServer:
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = root / "server.log"
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            mlflow_server_command(root, port),
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", port, root, log_path, proc)
    try:
        while True:
            if server.healthy():
                server.startup_s = time.monotonic() - t0
                return server
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {proc.returncode} before /health "
                    f"answered:\n{server.log_tail()}"
                )
            if time.monotonic() - t0 > STARTUP_TIMEOUT_S:
                raise RuntimeError(
                    f"mlflow server on port {port} not healthy after {STARTUP_TIMEOUT_S:.0f}s:"
                    f"\n{server.log_tail()}"
                )
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server shared by the whole test session."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        server.stop()
