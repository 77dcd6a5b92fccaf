"""`efficiency.lm_head: liger` against the chunked lm-head with Liger-Kernel's real kernel code, on CPU.

Liger's Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, which must be set before triton
is imported: hence the subprocess). This checks the numbers and gradients of the adapter (per-token losses,
sign, the folded logit scaling, the bias, the logit sums for the metrics) - not GPU speed, which
scripts/gpu_check.py measures. Not covered here: the soft-cap (Triton 3.9's interpreter cannot run Liger's
soft-cap branch: it calls ``.to`` on a Python float), which the load-time probe checks on the GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_liger_lm_head_matches_chunked_lm_head_loss_and_gradients():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("liger_interpreted.py"))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fallbacks"] == {}
    for nll_on_prompt in (False, True):
        leg = report[f"nll_on_prompt={nll_on_prompt}"]
        assert max(leg["metrics"].values()) < 1e-5, leg
        assert leg["grads"] < 1e-5, leg
    # logps, logit sums, and the gradients of hidden, weight, bias under per-token upstream gradients
    assert max(report["scaled_head"]) < 1e-5, report["scaled_head"]
