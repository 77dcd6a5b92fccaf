"""The device the model-facing unit tests run on: the CPU here and in CI. scripts/gpu_check.py runs some of them
again on a GPU (ORPO_TEST_DEVICE=cuda), so the family matrix's fast == plain checks also cover CUDA's kernels
(its SDPA backends for the per-segment attention, its matmuls for the chunked lm-head)."""

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("ORPO_TEST_DEVICE", "cpu"))


def on_test_device(batch: dict) -> dict:
    return {k: v.to(TEST_DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
