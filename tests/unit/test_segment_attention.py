"""Attention per segment (forward/segment_attention.py): the spans, the masks, no attention across segments or
over a whole row, and the loud fallback when a model does not pass the segments through."""

import dataclasses
import types

import pytest

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from orpo_ray.commands.families import build_model
from orpo_ray.config import Config, EfficiencySection, OrpoSection
from orpo_ray.forward.fast_path import resolve_fast_path
from orpo_ray.forward.packing import block_attention_mask, collate_packed, packed_token_stats
from orpo_ray.forward.segment_attention import (Segments, _Fp32FlashAttention, _fp32_kernel_applies, _fp32_sdpa,
                                                 build_segments, segment_spans)

ROWS = [{"prompt_ids": [256, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10, 11]},
        {"prompt_ids": [256, 12], "chosen_ids": [13], "rejected_ids": [14]}]


def _cfg():
    cfg = dataclasses.replace(Config(), orpo=OrpoSection(beta=0.3, nll_on_prompt=True))
    cfg.data.max_length = 32
    return dataclasses.replace(cfg, efficiency=EfficiencySection(lm_head_chunk_size=5))


def test_spans_are_the_runs_of_each_segment_id_row_by_row_padding_skipped():
    segment = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 3, -1, -1, -1]])
    assert segment_spans(segment) == [(0, 0, 3), (0, 3, 5), (1, 0, 2), (1, 2, 3)]


def test_a_prefix_shared_segment_gets_the_block_masks_diagonal_block_and_a_plain_one_none():
    shared = collate_packed(ROWS, pad_token_id=0, prefix_sharing=True, pack_length="all")
    segs = build_segments(shared["packed_segment"], shared["packed_branch"], "sdpa", torch.float32)
    dense = block_attention_mask(shared["packed_segment"], shared["packed_branch"])[0, 0]
    assert segs.spans == ((0, 0, 8), (0, 8, 12))
    for (_, start, end), mask in zip(segs.spans, segs.masks):
        assert torch.equal(mask[0, 0], dense[start:end, start:end])
    # first pair: prompt 0-2, chosen 3-4, rejected 5-7: the rejected part sees the prompt, not the chosen part
    assert segs.masks[0][0, 0, 5].tolist() == [True, True, True, False, False, True, False, False]
    plain = collate_packed(ROWS, pad_token_id=0, prefix_sharing=False, pack_length="all")
    assert build_segments(plain["packed_segment"], plain["packed_branch"], "sdpa", torch.float32).masks == (None,) * 4
    eager = build_segments(plain["packed_segment"], plain["packed_branch"], "eager", torch.float32).masks[0][0, 0]
    assert eager[0, 1] == torch.finfo(torch.float32).min and eager[1, 0] == 0  # eager adds its mask: causal floats


def test_attention_runs_once_per_segment_and_layer_never_over_the_row(monkeypatch):
    model = build_model("llama")
    sdpa, lengths = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def recording(module, q, k, v, mask, **kw):
        lengths.append(q.shape[2])
        return sdpa(module, q, k, v, mask, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording)
    batch = collate_packed(ROWS, pad_token_id=0, prefix_sharing=True, pack_length="all")
    packed_token_stats(model, batch, nll_on_prompt=True, chunk=None, segments=True)
    assert sorted(lengths) == sorted([8, 4] * model.config.num_hidden_layers)
    assert model.config._attn_implementation == "sdpa"  # restored after the packed forward


def test_a_model_that_drops_the_segments_keyword_falls_back_to_the_block_mask_alone():
    model = build_model("llama")
    for layer in model.model.layers:  # an attention module that does not pass its keyword arguments on
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, **kw: _f(*a, **{k: v for k, v in kw.items()
                                                                       if k != "orpo_segments"})
    fast = resolve_fast_path(model, _cfg())
    assert set(fast.fallbacks) == {"segment_attention"}
    assert "did not pass its forward's keyword arguments" in fast.fallbacks["segment_attention"]
    assert fast.record()["packing"] == "on" and fast.record()["prefix_sharing"] == "on"
    assert fast.lines() == ["[orpo-ray] efficiency.segment_attention falls back to the dense block mask for this run: "
                            + fast.fallbacks["segment_attention"]]


def _bf16_reference(module, q, k, v, mask, scaling):
    """transformers' own sdpa attention in fp32 on the bf16-rounded inputs, and its input gradients for ``grad``."""
    leaves = [t.detach().bfloat16().float().requires_grad_() for t in (q, k, v)]
    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, *leaves, mask, scaling=scaling)
    return out, leaves


@pytest.mark.parametrize("groups", [1, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("prefix_shared", [False, True], ids=["causal", "block-mask"])
def test_under_bf16_autocast_a_segment_runs_the_fp32_kernel_on_bf16_rounded_inputs(groups, prefix_shared):
    torch.manual_seed(0)
    s, heads = 29, 4
    module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    q = torch.randn(1, heads, s, 16, requires_grad=True)
    k, v = (torch.randn(1, heads // groups, s, 16, requires_grad=True) for _ in range(2))
    allowed = torch.ones(s, s, dtype=torch.bool).tril_()
    if prefix_shared:  # rejected rows 18.. do not see the chosen tokens 10..17
        allowed[18:, 10:18] = False
    segments = Segments("sdpa", ((0, 0, s),), (allowed[None, None] if prefix_shared else None,))
    grad = torch.randn(1, s, heads, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fp32_kernel_applies(q, "sdpa", {"scaling": 0.3, "dropout": 0.0})
        out = _fp32_sdpa(module, q, k, v, segments.fp32_mask(0), {"scaling": 0.3})
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref, leaves = _bf16_reference(module, q, k, v, segments.masks[0], 0.3)
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    assert out.dtype == torch.bfloat16  # what autocast's sdpa returns
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=8e-3)  # one bf16 rounding of the output
    for got, want in zip(grads, ref_grads):  # fp32 math, gradients rounded once to bf16 on their way back
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_the_fp32_kernel_applies_only_to_sdpa_on_cpu_under_low_precision_autocast_without_dropout_bias_or_softcap():
    q = torch.randn(1, 2, 3, 4)
    assert not _fp32_kernel_applies(q, "sdpa", {})  # no autocast: sdpa runs as called
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fp32_kernel_applies(q, "sdpa", {"scaling": 0.5, "dropout": 0.0, "sliding_window": 9})
        assert not _fp32_kernel_applies(q, "eager", {})
        assert not _fp32_kernel_applies(q, "sdpa", {"dropout": 0.1})
        assert not _fp32_kernel_applies(q, "sdpa", {"softcap": 30.0})
        assert not _fp32_kernel_applies(q, "sdpa", {"position_bias": torch.zeros(1)})


def test_a_prefix_shared_segments_fp32_mask_is_made_once_and_shared_by_every_layer():
    shared = collate_packed(ROWS, pad_token_id=0, prefix_sharing=True, pack_length="all")
    segs = build_segments(shared["packed_segment"], shared["packed_branch"], "sdpa", torch.float32)
    first = segs.fp32_mask(0)
    assert first is segs.fp32_mask(0) and first.dtype == torch.float32
    assert torch.equal(first == 0, segs.masks[0])  # 0 where attending is allowed, the float minimum elsewhere


def test_a_bf16_packed_step_on_cpu_calls_the_fp32_kernel_once_per_segment_and_layer_and_the_base_never(monkeypatch):
    model = build_model("llama")
    sdpa, calls, kernel = ALL_ATTENTION_FUNCTIONS["sdpa"], [], []

    def recording(module, q, k, v, mask, **kw):
        calls.append(q.shape[2])
        return sdpa(module, q, k, v, mask, **kw)

    apply = _Fp32FlashAttention.apply
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recording)
    monkeypatch.setattr(_Fp32FlashAttention, "apply", lambda *a: kernel.append(a[0].shape[2]) or apply(*a))
    batch = collate_packed(ROWS, pad_token_id=0, prefix_sharing=True, pack_length="all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = packed_token_stats(model, batch, nll_on_prompt=True, chunk=None, segments=True)
    stats.logps.sum().backward()
    assert sorted(kernel) == sorted([8, 4] * model.config.num_hidden_layers) and calls == []
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.layers[0].self_attn.parameters())
    kernel.clear()
    packed_token_stats(model, batch, nll_on_prompt=True, chunk=None, segments=True)  # fp32: sdpa as called
    assert kernel == [] and sorted(calls) == sorted([8, 4] * model.config.num_hidden_layers)
