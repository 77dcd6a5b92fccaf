"""scripts/measure_tokenization.py, the measurement behind docs/scaling.md's tokenization table, runs as documented
and reports both paths on the same pairs (it once imported a function that no longer existed and failed at once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.ray_train_helpers import ROOT

pytestmark = pytest.mark.integration


def test_measure_tokenization_reports_both_paths(local_ray_env):
    hh = ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
    assert hh.exists(), f"{hh} is missing: the script reads the shared HH file"
    p = subprocess.run([sys.executable, "scripts/measure_tokenization.py", "--cpus", "2", "--copies", "1",
                        "--vocab", "512"], cwd=ROOT, env={**local_ray_env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads([line for line in p.stdout.splitlines() if line.startswith('{"pairs"')][-1])
    assert report["copies"] == 1 and report["vocab"] == 512
    assert report["pairs"] > 2200  # HH harmless-base test: 2,312 pairs, a few quarantined in-process
    ray_data = report["ray_data"]
    # The Ray run splits off an eval set (data.eval_fraction) and quarantines the same kind of rows.
    assert 0.8 * report["pairs"] < ray_data["train_pairs"] < report["pairs"]
    assert report["in_process_1_thread"]["pairs_per_s"] > 0 and ray_data["pairs_per_s"] > 0
    assert ray_data["cpus"] == 2 and report["machine_cpus"] == os.cpu_count()
