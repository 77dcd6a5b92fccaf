"""scripts/gpu_check.sh runs end to end in its CPU dry-run mode and prints one JSON summary (format: README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu_prints_one_json_summary(tmp_path):
    # HOME: the Ray leg's local instance keeps its token under it.
    env = {**os.environ, "PYTHON": sys.executable, "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--skip-unit-tests", "--steps", "3", "--batch", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["passed"] is True and summary["errors"] == {}
    assert summary["checks"]["bf16_logps_dtype"] == "torch.float32"
    assert summary["checks"]["fast_vs_plain_loss_abs_diff_fp32"] < 1e-4
    assert set(summary["skipped"]) - {"trl"} == {"unit_tests", "liger"}, summary["skipped"]
    assert summary["skipped"]["unit_tests"] == "--skip-unit-tests"
    # Liger's fused lm-head leg says why it did not run (its kernels need CUDA), and adds no leg or comparison.
    assert "CUDA GPU" in summary["skipped"]["liger"] and "orpo-liger" not in summary["legs"]
    assert "liger_vs_chunked" not in summary and "liger_vs_chunked_loss_abs_diff_fp32" not in summary["checks"]
    # The fast path through Ray Train's worker with DeepSpeed ZeRO-2 (gloo here, NCCL on a GPU): one worker, the
    # same model, data and order as the in-process fast leg, so the same losses (fp32 here).
    assert "DeepSpeed ZeRO-2" in proc.stdout and "orpo-ray-deepspeed" in summary["legs"]
    assert summary["ray_deepspeed_first_loss_ok"] is True
    assert summary["ray_deepspeed_vs_fast"]["first_loss_abs_diff"] < 1e-5
    assert summary["legs"]["orpo-ray-deepspeed"]["fast_path"]["packing"] == "on"
    for name in ("orpo-plain", "orpo-fast", "orpo-ray-deepspeed"):
        leg = summary["legs"][name]
        assert leg["pairs_per_second"] > 0 and leg["tokens_per_second"] > 0 and leg["model_tflops"] > 0
        assert leg["mfu"] is None and leg["peak_gpu_mem_gb"] is None  # no GPU: no peak to divide by
    assert summary["parameters"] > 0 and summary["steps"] == 3
