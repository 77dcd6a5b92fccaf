"""`orpo-ray bench` (small: tiny model, 4 steps of 4 HH pairs): the fp32 loss equality with TRL's ORPOTrainer
that the README states is asserted, not only printed - per step, for the plain path, all switches and the Ray leg;
and `bench.repeats` measures every repeat, in rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
LEGS = ("[{name: trl-fp32, kind: trl, precision: fp32}, {name: orpo-plain-fp32, kind: orpo, precision: fp32},"
        " {name: orpo-all-fp32, kind: orpo, precision: fp32, overrides: [efficiency.chunked_lm_head=true,"
        " efficiency.prefix_sharing=true, efficiency.packing=true, efficiency.segment_attention=true]},"
        " {name: orpo-defaults-ray, kind: orpo, precision: fp32, ray: true}]")
TOLERANCE = 1e-6  # README: "equal" - relative difference of every step's loss below this


def test_bench_fp32_losses_equal_trl(tmp_path):
    if not HH.exists():
        pytest.skip(f"{HH} not present")
    out = tmp_path / "bench"
    overrides = [f"output_dir={out}", f"data.train_path={HH}", "model.tiny.hidden_size=64",
                 "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2", "model.tiny.intermediate_size=128",
                 "bench.vocab_size=512", "data.max_length=256", "data.max_prompt_length=128", "train.max_steps=4",
                 "train.per_device_batch_size=4", "efficiency.lm_head_chunk_size=64", "bench.matmul_size=128",
                 "bench.pairs=clean", "bench.repeats=2",
                 f"bench.legs={LEGS}"]
    proc = subprocess.run([sys.executable, "-m", "orpo_ray.cli", "bench", "configs/bench/hh_tiny8k.yaml", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert not [leg for leg in report["legs"] if "error" in leg], report["legs"]
    assert all(len(leg["losses"]) == 4 for leg in report["legs"])
    compared = report["ratios"]["loss_vs_trl_fp32"]
    assert set(compared) == {"orpo-plain-fp32", "orpo-all-fp32", "orpo-defaults-ray"}
    # Every repeat is a training run of its own. A Ray leg once reused its finished output_dir, which `orpo-ray
    # train` does not retrain, and reported the first run's figures again.
    for leg in report["legs"]:
        first, second = leg["pairs_per_second_runs"]
        assert first != second, (leg["name"], leg["pairs_per_second_runs"])
    # In rounds: every leg ran once before any leg ran again.
    starts = [leg["started_at_runs"] for leg in report["legs"]]
    assert max(first for first, _ in starts) < min(second for _, second in starts), starts
    for name, diff in compared.items():
        assert diff["max_step_relative_difference"] < TOLERANCE, (name, diff)
