"""Fixtures for integration tests that start their OWN Ray clusters.

* Every cluster gets a temporary ``HOME`` and an explicit token file (``RAY_AUTH_TOKEN_PATH``),
  never the user's ``~/.ray``, and its own short ``--temp-dir`` under /tmp.
* ``ray stop`` is never used: it kills every Ray process of the user (it matches process
  names, not temp dirs).  ``ray_cluster`` stops exactly the cluster it started, by signalling
  the process group of its ``ray start --head --block`` process (own session).
* ``TORCH_EXTENSIONS_DIR`` is pinned to a persistent cache so DeepSpeed's CPU shared-memory
  comm op (JIT-built on first use, ~35 s) is built once, not once per temporary HOME.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.mlflow_fixtures import MlflowServer, start_mlflow_server
from tests.integration.ray_train_helpers import DEMO, REVIEW_EXPERIMENT, SWEEP, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REAL_HOME = os.path.expanduser("~")
TORCH_EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(REAL_HOME, ".cache", "orpo_ray_torch_extensions")
# `ray job submit` needs the dashboard (ray[default] deps), absent from this venv.
HAVE_DASHBOARD = all(importlib.util.find_spec(m) for m in ("aiohttp", "aiohttp_cors", "opencensus"))


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs a real (local) Ray cluster / DeepSpeed; slow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_port_args() -> list:
    """Free ports for a node's agents. Their defaults (e.g. the dashboard agent's 52365) are fixed, so a second
    Ray on the machine - the session's `ray_local`, or anyone else's - would hold them and `ray job submit`
    then fails with "No available agent"."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


def _base_env(home: str) -> dict:
    """Env for a cluster of ours: temp HOME, explicit token file (RAY_AUTH_TOKEN_PATH).

    Relying on ray.init() to generate ~/.ray/auth_token was flaky: the gcs_server aborted with
    "Token authentication is enabled but Ray couldn't find an authentication token" when HOME
    changed inside one process.  An explicit token file avoids any HOME lookup."""
    tok = os.path.join(home, ".ray", "auth_token")
    if not os.path.exists(tok):
        os.makedirs(os.path.dirname(tok), exist_ok=True)
        with open(tok, "w") as f:
            f.write(uuid.uuid4().hex)
        os.chmod(tok, 0o600)
    env = dict(os.environ)
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    env.update(
        HOME=home,
        RAY_AUTH_TOKEN_PATH=tok,
        RAY_AUTH_MODE="token",
        TORCH_EXTENSIONS_DIR=TORCH_EXT_DIR,
        DS_ACCELERATOR="cpu",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
    )
    return env


@pytest.fixture(scope="session")
def _ray_local_session(tmp_path_factory):
    """ONE local Ray per pytest session (ray.init -> shutdown -> ray.init in one process with a
    different HOME crashed the new GCS), with a temp HOME / temp dir."""
    import ray

    base = tmp_path_factory.mktemp("ray_local")
    home = base / "home"
    home.mkdir()
    saved = dict(os.environ)
    env = _base_env(str(home))
    # Leave RAY_AUTH_MODE unset in THIS process: ray.init() then enables token auth itself and
    # refreshes its cached C++ config.  Setting RAY_AUTH_MODE=token here after ray._raylet was
    # loaded left the driver in 'disabled' mode -> "Failed to start GCS ... InvalidAuthToken".
    env.pop("RAY_AUTH_MODE", None)
    os.environ.clear()
    os.environ.update(env)
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: unix socket paths are limited
    ray.init(num_cpus=2, _temp_dir=temp_dir, include_dashboard=False)
    try:
        yield base
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def ray_local(_ray_local_session, tmp_path):
    """Local Ray (2 CPUs) started by ray.init in this process; token auth on.
    Returns a fresh storage dir for RunConfig(storage_path=...)."""
    return str(tmp_path / "storage")


@pytest.fixture
def ray_cluster(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with free ports, temp dir and temp HOME, in its
    own session/process group.  Yields dict(address, dashboard, env, storage, dashboard_ok).
    Stopped by SIGTERM then SIGKILL to that process group only; then asserts that no process
    mentioning our unique temp dir survives."""
    home = tmp_path / "home"
    home.mkdir()
    env = _base_env(str(home))  # RAY_AUTH_MODE=token + token file -> `ray start` enables auth
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    log_path = tmp_path / "ray_head.log"
    log = open(log_path, "w")
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--temp-dir", temp_dir, "--num-cpus", "2", *agent_port_args(),
           "--include-dashboard", "true" if HAVE_DASHBOARD else "false", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: {log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", dash if HAVE_DASHBOARD else port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("head did not come up")
                time.sleep(1)
        time.sleep(2)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env,
               "storage": str(tmp_path / "storage"), "dashboard_ok": HAVE_DASHBOARD}
    finally:
        _stop_group(proc)
        log.close()
        leftovers = [p for p in _procs_mentioning(temp_dir) if not _is_zombie(p)]
        for pid in leftovers:  # unique temp dir in their cmdline -> certainly ours
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not leftovers, f"processes of our cluster outside its process group: {leftovers}"


@contextlib.contextmanager
def local_ray_environment(parent: Path):
    """Env for a subprocess (`orpo-ray ...` without an address) that starts its own local Ray: temp HOME under
    `parent`, token file, and RAY_TMPDIR under a unique short temp dir. Afterwards no process mentioning that dir
    may survive (the local instance ends with its driver); leftovers are killed and fail the test."""
    home = parent / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env = _base_env(str(home))
    env["RAY_TMPDIR"] = temp_dir
    yield env
    deadline = time.time() + 30
    while (left := [p for p in _procs_mentioning(temp_dir) if not _is_zombie(p)]) and time.time() < deadline:
        time.sleep(1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the local Ray outlived its driver: {left}"


@pytest.fixture
def local_ray_env(tmp_path):
    """`local_ray_environment` for one test."""
    with local_ray_environment(tmp_path) as env:
        yield env


@dataclass
class ReviewedRuns:
    server: MlflowServer
    train_dir: Path
    sweep_dir: Path
    train_stdout: str
    tune_stdout: str


@pytest.fixture(scope="session")
def reviewed_runs(tmp_path_factory):
    """What a user reviews in MLflow, made once per session: a live `mlflow server` (SQLite), one short
    `orpo-ray train --local` and one 2 λ x 2 lr `orpo-ray tune` sweep with ASHA (its own local Ray), both logged
    into it by the CLI. The sweep test checks what the sweep wrote; the UI test reviews all of it in a browser.
    Shared because the sweep is the slowest thing either test does (~3-4 min on 2 cores)."""
    base = tmp_path_factory.mktemp("reviewed")
    server = start_mlflow_server(base / "mlflow")
    try:
        with local_ray_environment(base) as env:
            common = [*TINY, "tracking.enabled=true", f"tracking.mlflow_uri={server.uri}",
                      f"tracking.experiment={REVIEW_EXPERIMENT}", "tracking.system_metrics_interval_s=1",
                      "train.eval_interval=3"]
            # The output dirs name the runs: "ui-train λ=0.1 lr=0.003", "sweep ui-sweep".
            train = _cli(["train", DEMO, "--local", *common, f"output_dir={base / 'ui-train'}"], env)
            start = time.perf_counter()
            tune = _cli(["tune", DEMO, *common, *SWEEP, f"output_dir={base / 'ui-sweep'}"], env)
            print(f"\nreviewed_runs: the sweep took {time.perf_counter() - start:.0f} s end to end")
            yield ReviewedRuns(server, base / "ui-train", base / "ui-sweep", train.stdout, tune.stdout)
    finally:
        server.stop()


def _cli(args: list, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "orpo_ray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop only the processes of our own `ray start` session/process group."""
    pgid = proc.pid  # start_new_session=True -> pgid == pid
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline:
            proc.poll()  # reap our direct child
            if not [p for p in _pgid_members(pgid) if not _is_zombie(p)]:
                return
            time.sleep(0.5)


def _pgid_members(pgid: int) -> list:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    out.append(int(d))
            except OSError:
                pass
    return out


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _procs_mentioning(needle: str) -> list:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    out.append(int(d))
        except OSError:
            pass
    return out
