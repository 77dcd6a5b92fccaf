"""The family matrix: on every family the default (fast) path gives the plain path's first-step loss and
gradients (fp32, rel 1e-5), or the switch that cannot do so falls back with its reason (forward/fast_path.py)."""

import dataclasses

import pytest
import torch

from orpo_ray.config import Config, EfficiencySection, OrpoSection
from orpo_ray.forward.fast_path import SWITCHES, resolve_fast_path
from orpo_ray.forward.layouts import make_collate, make_policy_loss
from orpo_ray.forward.logprobs import policy_forward
from orpo_ray.objectives import build_objective
from orpo_ray.objectives.orpo import orpo_loss
from orpo_ray.commands.families import FAMILIES
from orpo_ray.commands.families import build_model as build_cpu_model
from tests.unit.device import TEST_DEVICE, on_test_device
from tests.unit.gradients import assert_gradients_equal

PLAIN = EfficiencySection(chunked_lm_head=False, prefix_sharing=False, packing=False, fused_layers=False)
# Families without an RMSNorm the fused norm reproduces (LayerNorm; Gemma's scales by 1 + weight), and those
# without a plain gated MLP (fc1/fc2 MLPs, Phi-3's fused gate_up_proj, MoE experts). fused_layers falls back by
# default where neither is there; with mlp_recompute off, wherever there is no fused norm.
NO_FUSED_NORM = {"gemma2", "gemma3", "phi2", "opt", "gpt_neox", "gpt2", "cohere"}
NO_GATED_MLP = {"phi2", "phi3", "opt", "gpt_neox", "gpt2", "qwen3_moe"}
NOTHING_TO_FUSE = NO_FUSED_NORM & NO_GATED_MLP
BOS, EOS, PAD = 256, 257, 258


def build_model(family, **kwargs):
    return build_cpu_model(family, **kwargs).to(TEST_DEVICE)


def _rows(with_bos=True):
    g = torch.Generator().manual_seed(0)
    draw = lambda lo, hi: torch.randint(3, 250, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_ids": [BOS] * with_bos + draw(2, 9), "chosen_ids": draw(1, 7) + [EOS],
             "rejected_ids": draw(1, 7) + [EOS]} for _ in range(3)]
    return rows


def _cfg(eff=None):
    cfg = dataclasses.replace(Config(), orpo=OrpoSection(beta=0.3, nll_on_prompt=True))
    cfg.data.max_length = 32
    return dataclasses.replace(cfg, efficiency=eff or EfficiencySection(lm_head_chunk_size=5))


def _loss_and_grads(model, cfg, rows, matmul_rows=1):
    model.zero_grad()
    batch = on_test_device(make_collate(cfg, PAD, matmul_rows)(rows))
    if matmul_rows > 1:  # the padded variant must have pad positions to be a test of them
        assert batch["packed_input_ids"].shape[1] > make_collate(cfg, PAD)(rows)["packed_input_ids"].shape[1]
    loss, metrics = make_policy_loss(cfg, build_objective(cfg))(model, batch)
    loss.backward()
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, cfg, rows, fast=None, matmul_rows=1):
    """cfg's path (after `fast.fuse`, when given; packed rows padded to ``matmul_rows``, as under CPU bf16)
    against the plain path on the model as loaded."""
    ref_m, ref_g = _loss_and_grads(model, _cfg(PLAIN), rows)
    if fast is not None:
        fast.fuse(model)
    m, g = _loss_and_grads(model, cfg, rows, matmul_rows)
    for k in ("loss", "nll_loss", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        torch.testing.assert_close(m[k], ref_m[k], rtol=1e-5, atol=1e-6, msg=k)
    assert g.keys() == ref_g.keys()
    assert_gradients_equal(g, ref_g)


@pytest.mark.parametrize("matmul_rows", [1, 24], ids=["rows-as-packed", "rows-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_path_equals_plain_path_on_every_family(family, matmul_rows):
    model = build_model(family)
    fast = resolve_fast_path(model, _cfg())
    # Every family here has a head and attention the fast path reproduces (bias, scaling, soft-cap, tied).
    record = fast.record()
    if family in NOTHING_TO_FUSE:
        assert record.pop("fused_layers").startswith("fallback: no gated MLP or RMSNorm module")
    assert record == dict.fromkeys(record, "on") and len(record) >= len(SWITCHES) - 1
    rows = _rows(with_bos=family not in ("qwen2", "qwen3"))
    if matmul_rows > 1:  # 45 or 42 tokens in the packed row: padded to 48 or 44 (`padded_rows`)
        rows[0] = {**rows[0], "prompt_ids": rows[0]["prompt_ids"] + [7]}
    _assert_same(model, fast.apply(_cfg()), rows, fast, matmul_rows)
    fused = _fused_classes(model)
    assert {name for name in fused if name.endswith("RMSNorm")} == (
        set() if family in NO_FUSED_NORM else {type(m).__name__ for m in model.modules()
                                               if type(m).__name__.endswith("RMSNorm")})
    assert any(name.endswith("MLP") for name in fused) == (family not in NO_GATED_MLP)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_FUSED_NORM])
def test_norms_only_equal_plain_path(family):
    """efficiency.mlp_recompute=false: the norms fused, every MLP on its own forward, the same numbers."""
    model = build_model(family)
    cfg = _cfg(EfficiencySection(lm_head_chunk_size=5, mlp_recompute=False))
    fast = resolve_fast_path(model, cfg)
    assert "fused_layers" not in fast.fallbacks
    _assert_same(model, fast.apply(cfg), _rows(with_bos=family not in ("qwen2", "qwen3")), fast)
    assert _fused_classes(model) and all(name.endswith("RMSNorm") for name in _fused_classes(model))


def _fused_classes(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if getattr(m.forward, "__func__", None) is not type(m).forward}


def test_eager_attention_gets_an_additive_mask():
    """eager adds the 4-D mask to the scores: a bool mask there would mask nothing (it did, silently)."""
    model = build_model("llama", attn_implementation="eager")
    assert not resolve_fast_path(model, _cfg()).fallbacks
    _assert_same(model, _cfg(), _rows())


def test_a_head_not_derivable_from_the_config_falls_back_with_its_reason():
    model = build_model("llama")
    model.config.final_logit_softcapping = 2.0  # the config claims a soft-cap the model's forward never applies
    fast = resolve_fast_path(model, _cfg())
    assert set(fast.fallbacks) == set(SWITCHES) - {"fused_layers"}
    assert "does not reproduce the model's own logits" in fast.fallbacks["chunked_lm_head"]
    assert fast.lines()[0].startswith("[orpo-ray] efficiency.chunked_lm_head falls back to the plain path")
    _assert_same(model, fast.apply(_cfg()), _rows())


def test_sliding_window_shorter_than_max_length_turns_the_packed_layouts_off():
    model = build_model("mistral")
    model.config.sliding_window = 4
    fast = resolve_fast_path(model, _cfg())
    assert set(fast.fallbacks) == {"prefix_sharing", "packing", "segment_attention"}
    assert "sliding window (4 tokens) is shorter than data.max_length (32)" in fast.fallbacks["packing"]
    assert fast.record()["chunked_lm_head"] == "on"
    _assert_same(model, fast.apply(_cfg()), _rows())


def test_attention_that_ignores_custom_masks_turns_the_packed_layouts_off():
    """Like flash attention (not installable here): a registered kernel that never reads the mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, q, k, v, attention_mask, **kw):
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kw)

    AttentionInterface.register("causal_only", causal_only)
    model = build_model("llama", attn_implementation="causal_only")
    fast = resolve_fast_path(model, _cfg())
    assert set(fast.fallbacks) == {"prefix_sharing", "packing", "segment_attention"}
    assert "does not take a custom 4-D attention mask" in fast.fallbacks["packing"]


def test_probe_leaves_rng_and_train_mode_alone():
    model = build_model("gpt2").train()
    state = torch.random.get_rng_state()
    resolve_fast_path(model, _cfg())
    assert torch.equal(state, torch.random.get_rng_state()) and model.training


def test_moe_router_aux_loss_is_not_added():
    """Qwen3-MoE with output_router_logits=True: the loss is ORPO on the logits alone (README: MoE)."""
    model = build_model("qwen3_moe")
    cfg, rows = _cfg(), _rows()
    m, _ = _loss_and_grads(model, cfg, rows)
    batch = on_test_device(make_collate(_cfg(PLAIN), PAD)(rows))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0  # the model does compute one
    ref, _ = orpo_loss(policy_forward(model, batch, True), 0.3)
    torch.testing.assert_close(m["loss"], ref.detach(), rtol=1e-5, atol=1e-6)


def test_segment_attention_auto_off_on_a_gpu_runs_the_dense_mask_with_the_same_numbers(monkeypatch):
    """What a GPU worker does with segment_attention 'auto' (the device rule stands in for a GPU here): the packed
    layouts stay on under the dense block mask, the record says why, and the numbers are the plain path's."""
    from orpo_ray.forward import fast_path as fast_path_module

    monkeypatch.setattr(fast_path_module, "segment_attention_auto_off",
                        lambda setting, device: "auto on cuda (stand-in)" if setting == "auto" else None)
    model = build_model("llama")
    fast = resolve_fast_path(model, _cfg())
    assert fast.record()["segment_attention"] == "off: auto on cuda (stand-in)" and not fast.fallbacks
    assert fast.record()["packing"] == fast.record()["prefix_sharing"] == "on"
    applied = fast.apply(_cfg())
    assert applied.efficiency.segment_attention is False and applied.efficiency.packing is True
    _assert_same(model, applied, _rows(), fast)
    explicit = resolve_fast_path(build_model("llama"), dataclasses.replace(
        _cfg(), efficiency=EfficiencySection(lm_head_chunk_size=5, segment_attention=True)))
    assert explicit.record()["segment_attention"] == "on"  # a user's true is kept
