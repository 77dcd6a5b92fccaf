"""Every speed-up gives the plain path's losses and gradients (fp32: ~1e-5; bf16 autocast: bf16 tolerance)."""

import dataclasses

import pytest
import torch

from orpo_ray.forward.chunked_lm_head import (
    LmHead,
    chunked_target_logps,
    malloc_keeps_freed_pages,
    release_chunk_buffers,
)
from orpo_ray.config import Config, EfficiencySection, ModelSection, OrpoSection, TinyModelSection
from orpo_ray.forward.layouts import make_collate, make_policy_loss
from orpo_ray.objectives import build_objective
from orpo_ray.objectives.cpo import CPO
from orpo_ray.objectives.orpo import ORPO
from orpo_ray.objectives.simpo import SimPO
from orpo_ray.modeling import build_tiny_model
from orpo_ray.forward.packing import block_attention_mask, collate_packed
from orpo_ray.precision import autocast_context
from orpo_ray.embedded_tokenizer import build_byte_tokenizer
from tests.unit.gradients import assert_gradients_equal

TOK = build_byte_tokenizer()
MODEL_CFG = ModelSection(tiny=TinyModelSection(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64))


def _rows(seed=0, pairs=3):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(3, 250, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": [TOK.bos_token_id] + draw(2, 9), "chosen_ids": draw(1, 7) + [TOK.eos_token_id],
             "rejected_ids": draw(1, 7) + [TOK.eos_token_id]} for _ in range(pairs)]


def _loss_and_grads(model, eff: EfficiencySection, rows, nll_on_prompt, precision="fp32", objective=None,
                    matmul_rows=1):
    """One training micro-batch's loss, metrics and gradients as the loop takes them (an NLL weight of 0.6, as a
    micro-batch with fewer NLL tokens than its step's average gets); packed rows padded to ``matmul_rows``."""
    cfg = dataclasses.replace(Config(), efficiency=eff, orpo=OrpoSection(beta=0.3, nll_on_prompt=nll_on_prompt))
    cfg.data.max_length = 32
    model.zero_grad()
    batch = make_collate(cfg, TOK.pad_token_id, matmul_rows)(rows)
    if matmul_rows > 1:  # the padded variant must have pad positions to be a test of them
        assert batch["packed_input_ids"].shape[1] > make_collate(cfg, TOK.pad_token_id)(rows)["packed_input_ids"].shape[1]
    with autocast_context(precision):
        loss, metrics = make_policy_loss(cfg, objective or build_objective(cfg))(model, batch, 0.6)
    torch.testing.assert_close(loss.detach().float(), metrics["loss"], rtol=1e-5, atol=1e-6)
    loss.backward()
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


PLAIN = EfficiencySection(chunked_lm_head=False, prefix_sharing=False, packing=False, segment_attention=False)
SWITCHES = {
    "chunked": dataclasses.replace(PLAIN, chunked_lm_head=True, lm_head_chunk_size=5),
    "prefix": dataclasses.replace(PLAIN, prefix_sharing=True),
    "packing": dataclasses.replace(PLAIN, packing=True, pack_length=64),
    "prefix+packing-to-longest": dataclasses.replace(PLAIN, prefix_sharing=True, packing=True),
    "prefix+packing+segments": dataclasses.replace(PLAIN, prefix_sharing=True, packing=True, segment_attention=True),
    "packing+segments": dataclasses.replace(PLAIN, packing=True, segment_attention=True),
    "prefix+segments, a pair per row": dataclasses.replace(PLAIN, prefix_sharing=True, segment_attention=True),
    "prefix+packing+chunked+segments, rows of 64": EfficiencySection(lm_head_chunk_size=7, pack_length=64),
    "the defaults (all on, one row)": EfficiencySection(lm_head_chunk_size=7),
    "the defaults, a group per pair": EfficiencySection(lm_head_chunk_size=1),
    "the defaults, one group": EfficiencySection(),
    "the defaults, loss not fused": EfficiencySection(lm_head_chunk_size=7, fused_loss=False),
    "chunked, loss not fused": dataclasses.replace(PLAIN, chunked_lm_head=True, lm_head_chunk_size=5, fused_loss=False),
}


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_matches_plain_path_fp32(name, nll_on_prompt):
    model, rows = build_tiny_model(MODEL_CFG, TOK), _rows()
    ref_m, ref_g = _loss_and_grads(model, PLAIN, rows, nll_on_prompt)
    m, g = _loss_and_grads(model, SWITCHES[name], rows, nll_on_prompt)
    for k in ("loss", "nll_loss", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        torch.testing.assert_close(m[k], ref_m[k], rtol=1e-5, atol=1e-5, msg=k)
    assert_gradients_equal(g, ref_g)


@pytest.mark.parametrize("name", ["the defaults (all on, one row)", "prefix+packing-to-longest", "packing+segments",
                                  "the defaults, loss not fused"])
def test_packed_rows_padded_for_matmul_shapes_give_the_same_loss_and_gradients(name):
    """Under CPU bf16 the loop pads packed rows to a multiple of 256 tokens (`matmul_shapes`): the pad positions
    are outside every segment, so no real token attends to them and no loss term reads them (fp32 here, where
    the padding is not applied by default, to compare at 1e-5)."""
    model, rows = build_tiny_model(MODEL_CFG, TOK), _rows(seed=4, pairs=4)
    ref_m, ref_g = _loss_and_grads(model, SWITCHES[name], rows, True)
    m, g = _loss_and_grads(model, SWITCHES[name], rows, True, matmul_rows=48)
    for k in ref_m:
        torch.testing.assert_close(m[k], ref_m[k], rtol=1e-5, atol=1e-6, msg=k)
    assert_gradients_equal(g, ref_g)


@pytest.mark.parametrize("objective", [SimPO(beta=2.0, gamma=0.5, alpha=0.3), CPO(beta=0.1, alpha=0.7),
                                       ORPO(beta=0.0), SimPO(beta=2.0, alpha=0.0)], ids=repr)
@pytest.mark.parametrize("name", ["the defaults (all on, one row)", "chunked"])
def test_every_objective_through_the_fused_loss_matches_the_plain_path(objective, name):
    model, rows = build_tiny_model(MODEL_CFG, TOK), _rows(seed=2, pairs=4)
    ref_m, ref_g = _loss_and_grads(model, PLAIN, rows, False, objective=objective)
    m, g = _loss_and_grads(model, SWITCHES[name], rows, False, objective=objective)
    for k in ref_m:
        if not k.startswith("logits/"):
            torch.testing.assert_close(m[k], ref_m[k], rtol=1e-5, atol=1e-6, msg=k)
    assert_gradients_equal(g, ref_g)


@pytest.mark.parametrize("name", ["plain", "the defaults (all on, one row)"])
def test_bf16_autocast_matches_fp32_within_bf16_tolerance(name):
    model, rows = build_tiny_model(MODEL_CFG, TOK), _rows(seed=1)
    ref_m, ref_g = _loss_and_grads(model, PLAIN, rows, True, "fp32")
    m, g = _loss_and_grads(model, SWITCHES.get(name, PLAIN), rows, True, "bf16")
    torch.testing.assert_close(m["loss"], ref_m["loss"], rtol=1e-2, atol=1e-2)
    for n in ref_g:  # bf16 has an 8-bit mantissa: compare gradient directions and norms
        cos = torch.nn.functional.cosine_similarity(g[n].flatten(), ref_g[n].flatten(), dim=0)
        assert cos > 0.99, (n, float(cos))
        torch.testing.assert_close(g[n].norm(), ref_g[n].norm(), rtol=5e-2, atol=1e-6)


def test_chunked_lm_head_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    logps, sums = chunked_target_logps(hidden, weight, targets, 3)
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, ref)
    torch.testing.assert_close(sums, (hidden @ weight.T).sum(-1).detach())
    assert torch.autograd.gradcheck(lambda h, w: chunked_target_logps(h, w, targets, 3)[0], (hidden, weight))


def test_chunked_lm_head_with_bias_scaling_and_softcap_gradcheck_fp64():
    """Phi-2's bias, Cohere/Granite's logit scaling and Gemma's final soft-cap, against autograd's reference."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    head = lambda w, b: LmHead(w, b, multiplier=1.5, divisor=4.0, softcap=0.7)  # noqa: E731
    logits = torch.tanh((hidden @ weight.T + bias) * 1.5 / 4.0 / 0.7) * 0.7
    logps, sums = chunked_target_logps(hidden, head(weight, bias), targets, 3)
    torch.testing.assert_close(logps, torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(sums, logits.sum(-1).detach())
    assert torch.autograd.gradcheck(lambda h, w, b: chunked_target_logps(h, head(w, b), targets, 3)[0],
                                    (hidden, weight, bias))


def _chunk_sized_allocations(chunks: int, bf16: bool, bias: bool, chunk: int = 64, vocab: int = 4096,
                             release: bool = True) -> int:
    """Allocations of at least one bf16 chunk of logits during a chunked lm-head forward and backward (after
    `release_chunk_buffers` unless ``release`` is False)."""
    from torch.profiler import ProfilerActivity, profile

    if release:
        release_chunk_buffers()
    g = torch.Generator().manual_seed(0)
    # H=32: a [V, H] tensor is at most one bf16 chunk (the fp32 weight gradient, counted once per call).
    hidden = torch.randn(chunks * chunk, 32, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, 32, generator=g) * 0.1).requires_grad_()
    head = LmHead(weight, torch.zeros(vocab, requires_grad=True) if bias else None)
    targets = torch.randint(0, vocab, (chunks * chunk,), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps, _ = chunked_target_logps(hidden, head, targets, chunk)
        logps.sum().backward()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= chunk * vocab * 2)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_chunked_lm_head_allocates_its_chunk_sized_tensors_once_per_call_not_per_chunk(bf16, bias):
    """A chunk of logits is tens of MB on real vocabularies: a fresh one per chunk is a fresh mmap that
    page-faults in each time (the bf16 path used to make 6 per chunk: product, fp32 copy, gradient cast...)."""
    one, four = _chunk_sized_allocations(1, bf16, bias), _chunk_sized_allocations(4, bf16, bias)
    assert one > 0
    assert four == one


def test_cpu_lm_head_calls_keep_their_chunk_buffers_until_released():
    """glibc (this test process's malloc) returns the pages of a freed tensor of 8 MB or more to the OS at once, so
    the lm-head keeps its chunk buffers from one call to the next on a CPU (`_ChunkBuffers.for_call`) instead of
    page-faulting them in again every step; the results do not depend on what the buffers held before."""
    assert not malloc_keeps_freed_pages()
    first = _chunk_sized_allocations(2, bf16=True, bias=False)
    assert first > 0
    again = _chunk_sized_allocations(2, bf16=True, bias=False, release=False)
    assert again < first  # the logits buffer and its bf16 twin came from the previous call
    assert _chunk_sized_allocations(2, bf16=True, bias=False) == first  # released: allocated afresh
    assert _chunk_sized_allocations(2, bf16=True, bias=False, vocab=4160, release=False) == first  # another head

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=g)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = chunked_target_logps(hidden, weight, targets, 20)
        return (logps, *torch.autograd.grad(logps.sum(), (hidden, weight)))

    release_chunk_buffers()
    fresh = run()
    for kept, ref in zip(run(), fresh):
        torch.testing.assert_close(kept, ref, rtol=0, atol=0)


def test_under_a_malloc_that_keeps_freed_pages_nothing_is_kept_between_calls(monkeypatch):
    """The workers' jemalloc keeps freed pages itself: the buffers go when the call ends, and their pages serve the
    backward's next allocations (a lower peak) without faulting in again."""
    from orpo_ray.forward import chunked_lm_head

    monkeypatch.setattr(chunked_lm_head, "malloc_keeps_freed_pages", lambda: True)
    first = _chunk_sized_allocations(2, bf16=True, bias=False)
    assert first > 0
    assert _chunk_sized_allocations(2, bf16=True, bias=False, release=False) == first
    assert chunked_lm_head._ChunkBuffers._kept is None


@pytest.mark.parametrize("hidden_size", [16, 512], ids=["weight-product-in-logits-buffer", "own-buffers"])
def test_bf16_chunked_lm_head_matches_autocast_linear_whichever_buffers_hold_the_weight_product(hidden_size):
    """The weight gradient's per-chunk product lives in the dead logits buffer when it fits (H <= 2/3 of the
    chunk's rows, 256 here: `matmul_shapes` pads them), else in buffers of its own: both give autograd's bf16
    results through nn.functional.linear."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(80, hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(300, hidden_size, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 300, (80,), generator=g)
    upstream = torch.randn(80, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = chunked_target_logps(hidden, weight, targets, 32)
        logits = torch.nn.functional.linear(hidden, weight).float()
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)  # same bf16 product, fp32 after it
    ours = torch.autograd.grad((logps * upstream).sum(), (hidden, weight))
    theirs = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    for a, b in zip(ours, theirs):  # bf16 matmuls in both, summed in different orders
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
        torch.testing.assert_close(a.norm(), b.norm(), rtol=1e-2, atol=0)


def test_block_mask_rejected_sees_prompt_not_chosen():
    rows = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}]
    b = collate_packed(rows, pad_token_id=0, prefix_sharing=True, pack_length=8)
    mask = block_attention_mask(b["packed_segment"], b["packed_branch"])[0, 0]
    assert b["packed_position_ids"][0, :6].tolist() == [0, 1, 2, 3, 2, 3]
    assert mask[4].tolist()[:6] == [True, True, False, False, True, False]   # first rejected token
    assert mask[3].tolist()[:6] == [True, True, True, True, False, False]    # last chosen token
    assert mask[6].tolist() == [False] * 6 + [True, False]                   # padding: itself only
    # the first rejected target is predicted from the last prompt token (index 1), not from index 3
    first_rejected = b["target_dst"].tolist().index(1 * b["input_ids"].shape[1] + 2)
    assert b["target_src"][first_rejected] == 1
