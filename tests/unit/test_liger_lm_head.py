"""`efficiency.lm_head: liger`: the rules that need no GPU (selection, config and load-time errors, the logit
sums). The numbers through Liger's real kernel: tests/integration/test_liger_lm_head.py (Triton's CPU
interpreter) and scripts/gpu_check.py (CUDA)."""

import dataclasses
import importlib.metadata
import sys
import types

import pytest
import torch

from orpo_ray.config import Config, ConfigError, EfficiencySection, ModelSection, TinyModelSection, load_config
from orpo_ray.embedded_tokenizer import build_byte_tokenizer
from orpo_ray.forward import liger_lm_head
from orpo_ray.forward.chunked_lm_head import LmHead, chunked_target_logps
from orpo_ray.forward.fast_path import resolve_fast_path
from orpo_ray.forward.layouts import make_token_stats
from orpo_ray.modeling import build_tiny_model
from orpo_ray.plan import format_plan, resolve_plan

CPU = torch.device("cpu")


def test_default_is_the_projects_chunked_lm_head():
    assert Config().efficiency.lm_head == "chunked"


@pytest.mark.parametrize("overrides, missing", [
    (["efficiency.lm_head=liger"], "scaling.use_gpu=true"),
    (["efficiency.lm_head=liger", "scaling.use_gpu=true", "efficiency.chunked_lm_head=false"], "chunked_lm_head=true"),
])
def test_liger_needs_gpu_workers_and_the_chunked_lm_head(overrides, missing):
    with pytest.raises(ConfigError, match=rf"efficiency\.lm_head=liger needs .*{missing}"):
        load_config(None, overrides)


def test_liger_config_with_gpu_and_chunked_lm_head_loads():
    cfg = load_config(None, ["efficiency.lm_head=liger", "scaling.use_gpu=true"])
    assert cfg.efficiency.lm_head == "liger"
    with pytest.raises(ConfigError, match=r"efficiency\.lm_head must be one of \['chunked', 'liger'\]"):
        load_config(None, ["efficiency.lm_head=fused"])


def test_selection_routes_the_target_rows_through_liger_only_when_asked():
    liger = dataclasses.replace(Config(), efficiency=EfficiencySection(lm_head="liger"))
    assert make_token_stats(liger, False).keywords["chunk"] is liger_lm_head.liger_target_logps
    assert make_token_stats(Config(), False).keywords["chunk"] == Config().efficiency.lm_head_chunk_size


def test_cpu_device_is_refused_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "run on a CUDA GPU and this worker's device is cpu" in liger_lm_head.liger_problem(CPU)


def test_missing_package_is_refused_with_the_install_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device rule

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert "liger-kernel is not installed on this worker: pip install 'liger-kernel==" in \
        liger_lm_head.liger_problem(CPU)


@pytest.mark.parametrize("version, ok", [("0.8.1", False), ("0.6.5", False), ("0.8.2", True), ("0.10.0", True),
                                         ("0.8.5.dev3+g1234", True)])
def test_versions_before_the_reduction_none_gradient_fix_are_refused(monkeypatch, version, ok):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    monkeypatch.setattr(liger_lm_head.importlib, "import_module", lambda name: None)
    problem = liger_lm_head.liger_problem(CPU)
    assert (problem is None) if ok else (f"liger-kernel {version} is installed; >= 0.8.2 is needed" in problem)


def test_fast_path_stops_a_cpu_run_that_asks_for_liger(monkeypatch):
    """Asked for by name: the load fails naming the key and the way out, instead of running the chunked head."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tok = build_byte_tokenizer()
    model = build_tiny_model(ModelSection(tiny=TinyModelSection(hidden_size=16, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=32)), tok)
    cfg = dataclasses.replace(Config(), efficiency=EfficiencySection(lm_head="liger"))
    with pytest.raises(ConfigError, match=r"efficiency\.lm_head=liger cannot be used: .*device is cpu.*"
                                          r"efficiency\.lm_head=chunked"):
        resolve_fast_path(model, cfg)
    assert not resolve_fast_path(model, Config()).fallbacks  # the chunked default loads as before


def _head(softcap=None):
    g = torch.Generator().manual_seed(0)
    head = LmHead(torch.randn(13, 6, generator=g), torch.randn(13, generator=g), multiplier=1.5, divisor=4.0,
                  softcap=softcap)
    return head, torch.randn(5, 6, generator=g)


@pytest.mark.parametrize("softcap", [None, 0.7])
def test_logit_row_sums_equal_the_heads_logits_summed(softcap):
    head, hidden = _head(softcap)
    torch.testing.assert_close(liger_lm_head.logit_row_sums(hidden, head, chunk=2), head.logits(hidden).sum(-1))


def test_liger_is_called_per_token_with_the_heads_bias_scale_and_softcap(monkeypatch):
    """With a stand-in for Liger's function (reduction='none' cross-entropy by autograd), the adapter gives the
    chunked lm-head's log-probs and gradients: the sign, the folded scale and the arguments are right."""
    calls = []

    class FakeFunction:
        @staticmethod
        def apply(x, weight, target, bias, ce_weight, ignore_index, lse_sq, smoothing, reduction, softcap, z_loss,
                  accum_dtype):
            calls.append(dict(ce_weight=ce_weight, reduction=reduction, softcap=softcap, z_loss=z_loss,
                              lse_sq=lse_sq, smoothing=smoothing, accum_dtype=accum_dtype))
            z = torch.nn.functional.linear(x, weight, bias)
            z = z if softcap is None else softcap * torch.tanh(z / softcap)
            return torch.nn.functional.cross_entropy(z, target, reduction=reduction), None, None, None

    module = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyFunction = FakeFunction
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", module)
    head, hidden = _head(softcap=0.7)
    for p in (head.weight, head.bias, hidden):
        p.requires_grad_(True)
    targets, upstream = torch.tensor([0, 3, 12, 5, 5]), torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0])
    results = []
    for fn in (liger_lm_head.liger_target_logps, lambda h, hd, t: chunked_target_logps(h, hd, t, 2)):
        logps, sums = fn(hidden, head, targets)
        grads = torch.autograd.grad((logps * upstream).sum(), (hidden, head.weight, head.bias))
        results.append((logps, sums, *grads))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref)
    assert calls == [dict(ce_weight=None, reduction="none", softcap=0.7, z_loss=False, lse_sq=0.0, smoothing=0.0,
                          accum_dtype=torch.float32)]


def test_the_plan_names_the_lm_head_kernel():
    shape = {"hidden": 8, "kv_hidden": 4, "intermediate": 16, "layers": 2, "heads": 2, "vocab": 10,
             "largest_layer_params": 80, "dense_scores": False}
    cfg = load_config(None, ["efficiency.lm_head=liger", "scaling.use_gpu=true", "scaling.memory_per_worker_gb=8"])
    plan = resolve_plan(cfg, shape=shape, trainable=10, total=10, use_deepspeed=False, device="cpu")
    assert plan["fast_path"]["lm_head"] == "liger" and "'lm_head': 'liger'" in format_plan(plan)
