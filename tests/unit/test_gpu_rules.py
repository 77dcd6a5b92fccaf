"""GPU-worker rules that can be checked without a GPU: worker environment, DeepSpeed accelerator and config,
precision on CUDA."""


import pytest
import torch

from orpo_ray.config import load_config
from orpo_ray.launch.session import worker_env
from orpo_ray.plan import resolve_plan
from orpo_ray.precision import autocast_context, select_precision
from orpo_ray.train.engine import build_deepspeed_config, deepspeed_section, ds_accelerator_for


def test_gpu_workers_never_inherit_a_cpu_deepspeed_accelerator(monkeypatch):
    """A CPU head node that exported DS_ACCELERATOR=cpu must not make DeepSpeed on GPU workers pick gloo + CPU ops."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert worker_env(use_gpu=True)["DS_ACCELERATOR"] == "cuda"
    assert worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"


def test_exported_nccl_settings_reach_gpu_workers_only(monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")
    gpu, cpu = worker_env(use_gpu=True), worker_env(use_gpu=False)
    assert gpu["NCCL_SOCKET_IFNAME"] == "eth0" and gpu["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    assert not any(k.startswith(("NCCL_", "TORCH_NCCL_")) for k in cpu)


def test_deepspeed_accelerator_follows_the_models_device():
    assert ds_accelerator_for(torch.device("cuda", 3)) == "cuda"
    assert ds_accelerator_for("cpu") == "cpu"


def test_resolved_deepspeed_config_of_the_7b_cluster_run():
    """What DeepSpeed gets for configs/cluster/mistral7b_zero2_8gpu.yaml: ZeRO-2 with overlapped reduction, bf16
    (no fp16 loss scaling), the trainer's batch and optimizer keys, no train_batch_size (derived per world size)."""
    cfg = load_config("configs/cluster/mistral7b_zero2_8gpu.yaml")
    t = cfg.train
    ds = build_deepspeed_config(deepspeed_section(cfg.deepspeed), micro_batch_size=t.per_device_batch_size,
                                grad_accum=t.gradient_accumulation_steps, lr=t.learning_rate,
                                weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                                warmup_steps=t.warmup_steps, total_steps=1000, bf16=True)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50_000_000, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in ds


@pytest.mark.parametrize("has_cuda, bf16_ok, requested, expected", [
    (True, True, "auto", "bf16"), (True, False, "auto", "fp32"), (False, False, "auto", "bf16"),
    (True, True, "fp32", "fp32"), (True, False, "bf16", "bf16"),
])
def test_precision_on_cuda(monkeypatch, has_cuda, bf16_ok, requested, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    precision, reason = select_precision(requested, "cuda")
    assert precision == expected
    assert ("no native bf16" in reason) == (requested == "bf16" and has_cuda and not bf16_ok)
    assert ("no GPU visible here" in reason) == (not has_cuda)  # planning a GPU run on a CPU machine


def test_bf16_autocast_targets_the_workers_device():
    ctx = autocast_context("bf16", "cuda")
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert not autocast_context("fp32", "cuda")._enabled


def test_ray_train_print_patch_is_off_on_workers_unless_exported(monkeypatch):
    """Ray Train's print patch sends each printed line to stdout and (through the root logger) to stderr: the
    driver showed every worker line twice. Off by default; a user who exports it keeps their value."""
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    assert worker_env()["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert worker_env(use_gpu=True)["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    assert worker_env()["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"


@pytest.mark.parametrize("setting, device, on", [("auto", "cpu", True), ("auto", "cuda", False), (True, "cuda", True),
                                                 (False, "cpu", False)])
def test_segment_attention_auto_is_off_on_gpu_workers(setting, device, on):
    """scripts/gpu_check.sh --ablation on an H200: one attention kernel per segment made the default path 6x slower
    than the dense block mask, so 'auto' runs it on CPU workers only; a user's true or false is kept anywhere."""
    from orpo_ray.forward.fast_path import segment_attention_auto_off
    from tests.unit.test_plan import SHAPE

    why = segment_attention_auto_off(setting, torch.device(device))
    assert (why is None) == (setting != "auto" or device == "cpu")
    cfg = load_config(None, [f"efficiency.segment_attention={str(setting).lower()}"])
    # The plan of such a run (what the run itself does: tests/unit/test_families.py).
    plan = resolve_plan(cfg, shape=SHAPE, trainable=10, total=10, use_deepspeed=False, device=device)
    assert plan["fast_path"]["segment_attention"] is on
