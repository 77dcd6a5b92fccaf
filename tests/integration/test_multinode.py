"""Two Ray nodes on this machine (two `ray start` processes on 127.0.0.1, 1 CPU each, token auth), one
Ray Train worker per node, checkpoints on shared storage (a local directory both nodes see)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, _base_env, _is_zombie, _procs_mentioning, _stop_group, free_port
from tests.integration.ray_train_helpers import TINY, losses

pytestmark = pytest.mark.integration
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _start_node(args: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: unix socket paths are limited
    cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", temp_dir,
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--disable-usage-stats", *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), temp_dir


@pytest.fixture
def two_nodes(tmp_path):
    """Head + one worker node, each in its own process group; stopped by signalling those groups only."""
    home = tmp_path / "home"
    home.mkdir()
    env = _base_env(str(home))
    port = free_port()
    nodes = [_start_node(["--head", "--port", str(port), "--include-dashboard", "false"], env, tmp_path / "head.log")]
    try:
        _wait_port(port, nodes[0][0], tmp_path / "head.log")
        nodes.append(_start_node(["--address", f"127.0.0.1:{port}"], env, tmp_path / "node2.log"))
        _wait_nodes(f"127.0.0.1:{port}", env, 2)
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp_dirs": [t for _, t in nodes]}
    finally:
        for proc, _ in reversed(nodes):
            _stop_group(proc)
        for _, temp_dir in nodes:
            leftovers = [p for p in _procs_mentioning(temp_dir) if not _is_zombie(p)]
            for pid in leftovers:  # its unique temp dir in the cmdline -> certainly ours
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError("head did not come up")
            time.sleep(1)


def _wait_nodes(address: str, env: dict, count: int, timeout: float = 90) -> None:
    probe = f"import ray; ray.init(address={address!r}); print('NODES', sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if f"NODES {count}" in p.stdout:
            return
        time.sleep(2)
    raise RuntimeError(f"{count} nodes did not join: {p.stdout[-1000:]} {p.stderr[-2000:]}")


def _ranks_logged(temp_dir: str) -> set[int]:
    """Ranks whose Ray Train worker wrote its log on this node (logs stay on the node that ran the worker)."""
    ranks = set()
    for log in Path(temp_dir).glob("session_*/logs/worker-*"):
        ranks |= {int(r) for r in re.findall(r"Reporting training result \d+: .* from rank (\d+)", log.read_text(errors="replace"))}
    return ranks


def test_one_worker_per_node_with_shared_storage(two_nodes, tmp_path):
    out, storage = tmp_path / "out", tmp_path / "shared_storage"
    cmd = [sys.executable, "-m", "orpo_ray.cli", "train", "configs/demo.yaml", *TINY, "scaling.num_workers=2",
           "train.per_device_batch_size=4", "train.checkpoint_interval=3", f"scaling.address={two_nodes['address']}",
           f"scaling.storage_path={storage}", f"output_dir={out}"]
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=two_nodes["env"], capture_output=True, text=True, timeout=900)
    print(f"\n2-node train: {time.perf_counter() - start:.1f} s")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["num_steps"] == 6 and sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    # One worker on each node: each node's own log directory holds exactly one rank's reports.
    per_node = [_ranks_logged(t) for t in two_nodes["temp_dirs"]]
    assert sorted(map(tuple, per_node)) == [(0,), (1,)], per_node
    # Both ranks' ZeRO-2 shards landed in one checkpoint on the shared storage.
    shards = {p.name for p in storage.rglob("zero_pp_rank_*_optim_states.pt")}
    assert shards == {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
