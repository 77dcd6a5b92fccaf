"""Precision is chosen from the CPU's instruction set, never blindly bf16."""

import torch

from orpo_ray import precision


def test_explicit_fp32_is_honoured():
    assert precision.select_precision("fp32")[0] == "fp32"


def test_auto_uses_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    chosen, reason = precision.select_precision("auto")
    assert chosen == "fp32" and "slow" in reason


def test_auto_uses_bf16_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.select_precision("auto")[0] == "bf16"


def test_explicit_bf16_on_slow_cpu_warns_in_reason(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    chosen, reason = precision.select_precision("bf16")
    assert chosen == "bf16" and "slow" in reason


def test_fast_bf16_needs_native_flag(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert precision.cpu_has_fast_bf16() is False


def test_autocast_context_only_casts_for_bf16():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.autocast_context("bf16"):
        assert lin(x).dtype == torch.bfloat16
    with precision.autocast_context("fp32"):
        assert lin(x).dtype == torch.float32


def test_hardware_summary_names_the_cpu():
    summary = precision.hardware_summary()
    assert summary["cpu"] and summary["cpu_capability"]


def _cache_bounds_after_import(env: dict) -> list[str]:
    import subprocess
    import sys

    code = "import os, orpo_ray; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_importing_orpo_ray_bounds_the_onednn_and_ideep_caches_unless_the_user_set_them():
    """oneDNN's and ideep's default 1,024-entry caches grew the RSS by GBs (oneDNN) and ~470 MB (ideep, bf16) on
    shape-varying packed batches (README, Memory over long runs)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    assert _cache_bounds_after_import(env) == ["64", "8"]
    assert _cache_bounds_after_import({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "2"}) == ["16", "2"]
