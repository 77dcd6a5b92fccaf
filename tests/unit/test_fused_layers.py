"""forward/fused_layers.py: the fused gated MLP and RMSNorm give the module's own numbers and keep less for backward."""

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.activations import ACT2FN

from orpo_ray.commands.families import build_model
from orpo_ray.config import Config, DeepSpeedSection
from orpo_ray.forward.fast_path import resolve_fast_path
from orpo_ray.forward.fused_layers import GatedMLPFunction, RMSNormFunction

MLP_TOO = dataclasses.replace(Config(), efficiency=dataclasses.replace(Config().efficiency, mlp_recompute=True))


def _mlp_inputs(hidden, inter, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return [r(2, 3, hidden), r(inter, hidden), r(inter) if bias else None, r(inter, hidden), r(inter) if bias else None,
            r(hidden, inter), r(hidden) if bias else None]


def _reference_mlp(x, wg, bg, wu, bu, wd, bd, act):
    return F.linear(act(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_passes_gradcheck(act, bias):
    inputs = _mlp_inputs(4, 6, bias)
    assert torch.autograd.gradcheck(lambda *a: GatedMLPFunction.apply(*a, ACT2FN[act]), inputs)


@settings(max_examples=20, deadline=None)
@given(hidden=st.integers(1, 9), inter=st.integers(1, 13), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gated_mlp_equals_the_plain_composition(hidden, inter, bias, seed):
    inputs = _mlp_inputs(hidden, inter, bias, seed)
    _assert_mlp_matches_reference(inputs, ACT2FN["silu"])


def _assert_mlp_matches_reference(inputs, act):
    """Output and every gradient of the fused MLP equal the plain composition's (fp64)."""
    ours, ref = GatedMLPFunction.apply(*inputs, act), _reference_mlp(*inputs, act)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    d_out = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wrt = [t for t in inputs if t is not None]
    for a, b in zip(torch.autograd.grad(ours, wrt, d_out), torch.autograd.grad(ref, wrt, d_out)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gated_mlp_with_an_activation_that_returns_its_input():
    """The forward multiplies act(gate) by up in place; an identity activation hands back gate itself, which
    backward still needs, so that product must be a new tensor."""
    _assert_mlp_matches_reference(_mlp_inputs(4, 6, bias=True), torch.nn.Identity())


class _LiveIntermediates(TorchDispatchMode):
    """The most [tokens, intermediate]-sized tensors that the ops it sees allocate and keep alive at once (by
    storage, until freed; views and in-place results are not new storage)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.live, self.most = numel, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                key = t.untyped_storage().data_ptr()
                if key not in self.live and key not in inputs:
                    self.live.add(key)
                    weakref.finalize(t.untyped_storage(), self.live.discard, key)
        self.most = max(self.most, len(self.live))
        return out


@pytest.mark.parametrize("act, most", [("silu", 3), ("gelu_pytorch_tanh", 4)])
def test_gated_mlp_backward_holds_few_intermediates(act, most):
    """Backward works in place: with gate and up saved, at most three more [T, intermediate] tensors at once
    under SiLU (the first version held six); another activation keeps its own autograd graph's output too."""
    tokens, hidden, inter = 64, 8, 24
    inputs = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None
              for t in _mlp_inputs(hidden, inter, bias=False)]
    inputs[0] = torch.randn(1, tokens, hidden, requires_grad=True)
    out = GatedMLPFunction.apply(*inputs, ACT2FN[act])
    counter = _LiveIntermediates(tokens * inter)
    with counter:
        torch.autograd.grad(out, [t for t in inputs if t is not None], torch.ones_like(out))
    assert counter.most == most


def test_rms_norm_passes_gradcheck_and_equals_llamas():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    norm = LlamaRMSNorm(5, eps=1e-6).double()
    norm.weight.data.copy_(w.detach())
    # transformers takes the statistics in fp32 even for fp64 input; the fused norm in the wider of the two.
    torch.testing.assert_close(RMSNormFunction.apply(x, w, 1e-6), norm(x), rtol=1e-6, atol=1e-6)
    x32, w32 = x.detach().float(), w.detach().float()
    torch.testing.assert_close(RMSNormFunction.apply(x32, w32, 1e-6), norm.float()(x32), rtol=0, atol=0)


def _saved_activation_bytes(fn, x, params):
    """Bytes autograd keeps for backward, parameters excluded (they are kept either way)."""
    seen, param_ptrs = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def test_fused_blocks_keep_only_the_inputs_they_need():
    model = build_model("llama")
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].input_layernorm
    tokens, hidden, inter = 7, mlp.gate_proj.in_features, mlp.gate_proj.out_features
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    own_mlp = _saved_activation_bytes(lambda t: type(mlp).forward(mlp, t), x, list(mlp.parameters()))
    own_norm = _saved_activation_bytes(lambda t: type(norm).forward(norm, t), x, list(norm.parameters()))
    resolve_fast_path(model, MLP_TOO).fuse(model)
    fused_mlp = _saved_activation_bytes(mlp, x, list(mlp.parameters()))
    fused_norm = _saved_activation_bytes(norm, x, list(norm.parameters()))
    assert fused_mlp == 4 * tokens * (hidden + 2 * inter)  # x, gate, up (fp32)
    assert own_mlp == 4 * tokens * (hidden + 4 * inter)   # x, gate, up, act(gate), act(gate) * up
    assert fused_norm == 4 * tokens * (hidden + 1)        # x and the inverse RMS
    assert own_norm > fused_norm


def test_a_class_that_differs_keeps_its_own_forward_and_says_why():
    model = build_model("gemma2")  # Gemma's RMSNorm scales by (1 + weight)
    cfg = Config()
    fast = resolve_fast_path(model, dataclasses.replace(cfg, efficiency=dataclasses.replace(cfg.efficiency,
                                                                                             mlp_recompute=True)))
    assert fast.layers["Gemma2MLP"] == "fused"
    assert fast.layers["Gemma2RMSNorm"].startswith("differs from its own forward")
    assert any("Gemma2RMSNorm keeps its own forward" in line for line in fast.lines())
    assert fast.fuse(model) == {"Gemma2MLP": 2}


def test_a_projection_wrapped_after_fusing_is_not_bypassed():
    model = build_model("llama")
    resolve_fast_path(model, MLP_TOO).fuse(model)
    mlp = model.model.layers[0].mlp

    class Doubled(torch.nn.Module):  # stands for a LoRA wrapper around the Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return 2 * self.inner(t)

    mlp.up_proj = Doubled(mlp.up_proj)
    x = torch.randn(1, 4, mlp.gate_proj.in_features)
    torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x))
    torch.testing.assert_close(mlp(x), mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * 2 * mlp.up_proj.inner(x)))


def test_by_default_norms_and_gated_mlps_are_fused():
    model = build_model("llama")
    fast = resolve_fast_path(model, Config())
    assert fast.layers == {"LlamaRMSNorm": "fused", "LlamaMLP": "fused"}
    assert fast.fuse(model) == {"LlamaRMSNorm": 5, "LlamaMLP": 2}


def test_mlp_recompute_off_fuses_the_norms_only():
    model = build_model("llama")
    cfg = dataclasses.replace(Config(), efficiency=dataclasses.replace(Config().efficiency, mlp_recompute=False))
    fast = resolve_fast_path(model, cfg)
    assert fast.layers == {"LlamaRMSNorm": "fused"} and fast.fuse(model) == {"LlamaRMSNorm": 5}


def test_zero3_falls_back():
    cfg = dataclasses.replace(Config(), deepspeed=DeepSpeedSection(enabled=True, zero_stage=3))
    fast = resolve_fast_path(build_model("llama"), cfg)
    assert "ZeRO-3" in fast.fallbacks["fused_layers"]
    assert fast.fuse(build_model("llama")) == {}


def test_the_check_leaves_the_rng_alone():
    model = build_model("qwen3")
    state = torch.random.get_rng_state()
    resolve_fast_path(model, MLP_TOO)
    assert torch.equal(state, torch.random.get_rng_state())


def test_under_bf16_autocast_gradients_stay_fp32_and_close():
    model = build_model("llama")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, mlp.gate_proj.in_features)

    def grads(forward):
        mlp.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x)
        out.float().pow(2).sum().backward()
        return out, {n: p.grad.clone() for n, p in mlp.named_parameters()}

    own_out, own = grads(lambda t: type(mlp).forward(mlp, t))
    fused_out, fused = grads(lambda t: GatedMLPFunction.apply(t, mlp.gate_proj.weight, None, mlp.up_proj.weight,
                                                               None, mlp.down_proj.weight, None, mlp.act_fn))
    assert fused_out.dtype == own_out.dtype == torch.bfloat16
    for name in own:
        assert fused[name].dtype == torch.float32
        torch.testing.assert_close(fused[name], own[name], rtol=2e-2, atol=2e-2)
