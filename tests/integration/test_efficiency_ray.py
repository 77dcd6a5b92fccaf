"""The speed-ups under Ray Train + DeepSpeed ZeRO-2 with 2 workers: the same loop, the same losses as the plain
path (prefix sharing + packing + chunked lm-head change the arithmetic order only), and tokens/s reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orpo_ray.forward.fast_path import SWITCHES
from orpo_ray.config import load_config
from orpo_ray.launch.trainer import run_training

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1",
         "data.synthetic.num_train=128", "data.synthetic.num_eval=16", "train.learning_rate=3e-3",
         "train.max_steps=4", "train.log_interval=1", "train.eval_interval=0", "train.eval_max_batches=1",
         "train.precision=fp32", "train.progress_bar=false", "tracking.enabled=false", "export.save_model=false",
         "scaling.num_workers=2", "train.per_device_batch_size=4", "deepspeed.enabled=true", "deepspeed.zero_stage=2",
         "orpo.nll_on_prompt=true"]
FAST = ["efficiency.lm_head_chunk_size=16"]  # the defaults: every switch on
PLAIN = ["efficiency.chunked_lm_head=false", "efficiency.prefix_sharing=false", "efficiency.packing=false",
         "efficiency.fused_layers=false"]


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "history.json").read_text()) if "loss" in row]


def test_speedups_under_ray_deepspeed_zero2_two_workers(_ray_local_session, tmp_path):
    runs = {}
    for name, extra in (("plain", PLAIN), ("fast", FAST)):
        cfg = load_config(ROOT / "configs" / "demo.yaml",
                          [*SMALL, f"output_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", *extra])
        runs[name] = run_training(cfg)
    assert runs["fast"]["world_size"] == 2
    assert runs["fast"]["fast_path"] == dict.fromkeys(SWITCHES, "on")
    assert runs["fast"]["tokens_per_second"] > 0 and runs["fast"]["pairs_per_second"] > 0
    plain, fast = _losses(tmp_path / "plain"), _losses(tmp_path / "fast")
    assert len(plain) == len(fast) == 4 and len(set(plain)) > 1
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-4, atol=1e-6)
