"""Choose the compute precision from what the hardware actually runs fast.

Why this exists: on CPUs with native bf16 dot products (Intel AMX, AVX512_BF16 on Cooper Lake / Zen 4)
bf16 matmuls are 2-7x faster than fp32, but on AVX2-only CPUs PyTorch emulates bf16 and a matmul is
100-1000x *slower* (measured: a 2048^2 bf16 matmul took 51 s). So ``precision: auto`` only picks bf16
where the instruction set has it, and falls back to fp32 everywhere else.

Pure module: torch only.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """Human-readable CPU model, for benchmark reports ("which CPU did this run on")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions *and* oneDNN will use them.

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone is not enough: it is also true on plain
    AVX512 parts where bf16 is emulated. We additionally require the avx512_bf16 or amx_bf16 flag.
    """
    try:
        mkldnn_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_ok = False
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    flags = _cpu_flags()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    return mkldnn_ok and capability.startswith("AVX512") and native


def hardware_summary() -> dict:
    """What benchmarks and results.json record about the machine."""
    return {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # the process's own: in results.json the training worker's (Ray starts its workers at 15; README, Performance)
        "niceness": os.nice(0),
    }


def select_precision(requested: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """Resolve ``train.precision`` ('auto' | 'fp32' | 'bf16') to 'fp32' or 'bf16', with the reason.

    An explicit 'bf16' is honoured even where it is slow (the user asked), but the reason says so.
    """
    device = torch.device(device)
    if requested == "fp32":
        return "fp32", "requested"
    if device.type == "cuda":
        if not torch.cuda.is_available():  # `orpo-ray plan` of a GPU run on a machine without one
            return "bf16", f"{requested}; no GPU visible here to check, bf16 assumed (every GPU since Ampere has it)"
        ok = torch.cuda.is_bf16_supported()
        if requested == "bf16":
            return "bf16", "requested" if ok else "requested, but this GPU has no native bf16"
        return ("bf16", "GPU supports bf16") if ok else ("fp32", "GPU lacks bf16")
    fast = cpu_has_fast_bf16()
    if requested == "bf16":
        return "bf16", "requested" if fast else "requested, but this CPU emulates bf16 (slow)"
    if requested != "auto":
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {requested!r}")
    if fast:
        return "bf16", f"CPU has native bf16 ({torch.backends.cpu.get_cpu_capability()})"
    return "fp32", f"CPU has no native bf16 matmul ({torch.backends.cpu.get_cpu_capability()}); bf16 would be slow"


def autocast_context(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast for the model's matmuls; loss and log-probs are computed in fp32 regardless."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
