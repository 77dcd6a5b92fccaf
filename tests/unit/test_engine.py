"""Fast tests of the plain-torch engine and the DeepSpeed config builder (no DeepSpeed import)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from orpo_ray.train.engine import (
    TorchEngine,
    build_deepspeed_config,
    create_engine,
    lr_lambda_factory,
    make_param_groups,
)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.l2 = torch.nn.Linear(8, 1)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return self.l2(self.drop(self.norm(torch.relu(self.l1(x))))).squeeze(-1)


def _data(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(-1)


def _engine(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(use_deepspeed=False, lr=1e-2, total_steps=10, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0)
    args.update(kw)
    return create_engine(Tiny(), **args)


def _run(engine, steps, micro_per_step=1, start=0):
    losses = []
    for s in range(start, start + steps):
        x, y = _data(s, 8 * micro_per_step)
        for m in range(micro_per_step):
            xs, ys = x[m * 8:(m + 1) * 8], y[m * 8:(m + 1) * 8]
            loss = torch.nn.functional.mse_loss(engine.model(xs), ys)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def test_lr_schedule_warmup_cosine_linear():
    f = lr_lambda_factory(2, 10, "cosine")
    assert [f(0), f(1), f(2)] == [0.0, 0.5, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)
    g = lr_lambda_factory(2, 10, "linear", min_lr_ratio=0.1)
    assert g(6) == pytest.approx(0.1 + 0.9 * 0.5) and g(10) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_lambda_factory(11, 10)


def test_engine_lr_and_global_step_follow_schedule():
    e = _engine(grad_accum=2)
    assert isinstance(e, TorchEngine) and e.lr() == 0.0  # warmup starts at 0
    _run(e, 3, micro_per_step=2)
    assert e.global_step == 3
    assert e.lr() == pytest.approx(1e-2 * (0.5 * (1 + math.cos(math.pi * 1 / 8))))


def test_param_groups_no_decay_for_bias_and_norm():
    groups = make_param_groups(Tiny(), 0.1)
    assert groups[0]["weight_decay"] == 0.1 and all(p.ndim == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4  # l1.bias, norm.weight, norm.bias, l2.bias
    assert sum(len(g["params"]) for g in groups) == len(list(Tiny().parameters()))


def test_grad_accumulation_equals_big_batch():
    """2 micro-batches of 8 with accum 2 == 1 batch of 16 (mean losses, no dropout)."""
    a, b = _engine(grad_accum=2), _engine(grad_accum=1)
    a.eval(), b.eval()
    for s in range(3):
        x, y = _data(s, 16)
        for m in range(2):
            a.backward(torch.nn.functional.mse_loss(a.model(x[m * 8:(m + 1) * 8]), y[m * 8:(m + 1) * 8]))
            a.step()
        b.backward(torch.nn.functional.mse_loss(b.model(x), y))
        b.step()
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)  # accumulated grad == big-batch grad
    assert a.global_step == b.global_step == 3
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_step_only_at_accumulation_boundary():
    e = _engine(grad_accum=3)
    w0 = e.module.l1.weight.detach().clone()
    e.model(torch.ones(2, 4)).sum().backward()
    assert e.is_accumulation_boundary() is False
    e.step()
    assert e.global_step == 0 and torch.equal(w0, e.module.l1.weight)


def test_grad_clipping_reports_preclip_norm():
    e = _engine(max_grad_norm=1e-3, warmup_steps=0)
    loss = (e.model(torch.full((8, 4), 100.0)) ** 2).mean()
    e.backward(loss)
    grads_norm = torch.nn.utils.get_total_norm([p.grad for p in e.module.parameters()])
    e.step()
    assert e.grad_norm == pytest.approx(float(grads_norm), rel=1e-5) and e.grad_norm > 1e-3


def test_same_seed_same_trajectory_and_resume_is_exact(tmp_path):
    ref = _run(_engine(seed=5), 6)
    assert ref == _run(_engine(seed=5), 6)
    e = _engine(seed=5)
    first = _run(e, 3)
    torch.manual_seed(999)  # RNG state (dropout) must come from the checkpoint
    e.save(str(tmp_path / "ck"), client_state={"epoch": 1})
    _run(e, 2, start=3)  # diverge after saving
    r = _engine(seed=123)
    assert r.load(str(tmp_path / "ck")) is True
    assert r.global_step == 3 and r.client_state == {"epoch": 1}
    assert first == ref[:3]
    # A resumed engine (weights, optimizer, scheduler AND RNG from the checkpoint) must equal the
    # saving engine continued without interruption (from the same RNG state):
    e2 = _engine(seed=5)
    _run(e2, 3)
    torch.manual_seed(999)
    cont = _run(e2, 3, start=3)
    r2 = _engine(seed=77)
    r2.load(str(tmp_path / "ck"))
    assert _run(r2, 3, start=3) == cont


def test_resume_restores_accumulation_position(tmp_path):
    e = _engine(grad_accum=3)
    for _ in range(4):  # 1 optimizer step + 1 micro step
        e.backward(e.model(torch.ones(2, 4)).sum())
        e.step()
    e.save(str(tmp_path / "ck"))
    r = _engine(grad_accum=3)
    r.load(str(tmp_path / "ck"))
    assert r.global_step == 1 and r.is_accumulation_boundary() is False
    r.step()
    assert r.is_accumulation_boundary() is True


def test_load_missing_returns_false(tmp_path):
    e = _engine()
    assert e.load(None) is False and e.load(str(tmp_path)) is False


def test_build_deepspeed_config():
    cfg = build_deepspeed_config(
        {"enabled": True, "zero_optimization": {"overlap_comm": False}, "train_batch_size": 99,
         "scheduler": {"type": "WarmupLR"}, "steps_per_print": 5},
        micro_batch_size=2, grad_accum=4, lr=1e-4, weight_decay=0.01, max_grad_norm=1.0,
        warmup_steps=10, total_steps=100, bf16=True)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert "enabled" not in cfg and "train_batch_size" not in cfg and "scheduler" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0 and cfg["steps_per_print"] == 5
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                            "weight_decay": 0.01, "torch_adam": True, "fused": True}}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    with pytest.raises(ValueError):
        build_deepspeed_config({}, micro_batch_size=0, grad_accum=1, lr=1e-4, weight_decay=0, max_grad_norm=1,
                               warmup_steps=0, total_steps=1, bf16=False)


def test_create_engine_rejects_inconsistent_ds_config():
    cfg = build_deepspeed_config({}, micro_batch_size=1, grad_accum=2, lr=1e-3, weight_decay=0.0,
                                 max_grad_norm=1.0, warmup_steps=0, total_steps=4, bf16=False)
    with pytest.raises(ValueError):
        create_engine(Tiny(), use_deepspeed=True, ds_config=cfg, lr=1e-3, total_steps=4, grad_accum=1)


def test_torch_engine_does_not_import_deepspeed():
    import sys

    _run(_engine(), 1)
    assert "deepspeed" not in sys.modules or os.environ.get("PYTEST_XDIST_WORKER")

