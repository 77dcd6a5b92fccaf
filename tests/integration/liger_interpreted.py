"""Run by test_liger_lm_head.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported):
Liger-Kernel's real fused linear cross-entropy, on CPU through Triton's interpreter, against the project's
chunked lm-head. Prints one JSON line of max relative differences."""

import dataclasses
import json
import sys

import torch

from orpo_ray.config import Config, EfficiencySection, ModelSection, OrpoSection, TinyModelSection
from orpo_ray.embedded_tokenizer import build_byte_tokenizer
from orpo_ray.forward.chunked_lm_head import LmHead, chunked_target_logps
from orpo_ray.forward.fast_path import resolve_fast_path
from orpo_ray.forward.layouts import make_collate, make_token_stats
from orpo_ray.forward.liger_lm_head import liger_target_logps
from orpo_ray.forward.logprobs import policy_forward
from orpo_ray.modeling import build_tiny_model
from orpo_ray.objectives.orpo import orpo_loss


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def training_step(model, tok, eff, rows, nll_on_prompt):
    cfg = dataclasses.replace(Config(), efficiency=eff, orpo=OrpoSection(beta=0.3, nll_on_prompt=nll_on_prompt))
    model.zero_grad()
    batch = make_collate(cfg, tok.pad_token_id)(rows)
    out = policy_forward(model, batch, nll_on_prompt, token_stats=make_token_stats(cfg, nll_on_prompt))
    loss, metrics = orpo_loss(out, cfg.orpo.beta)
    loss.backward()
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def main() -> None:
    tok = build_byte_tokenizer()
    model = build_tiny_model(ModelSection(tiny=TinyModelSection(hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=64)), tok)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, 250, (n,), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_ids": [tok.bos_token_id] + draw(p), "chosen_ids": draw(c) + [tok.eos_token_id],
             "rejected_ids": draw(r) + [tok.eos_token_id]} for p, c, r in [(5, 3, 4), (2, 6, 2)]]
    report = {}
    chunked = EfficiencySection(lm_head_chunk_size=7)  # the defaults: all three switches on
    liger = dataclasses.replace(chunked, lm_head="liger")
    # The load-time check (a probe through Liger against the model's own head) passes on this model.
    cfg = dataclasses.replace(Config(), efficiency=liger)
    report["fallbacks"] = resolve_fast_path(model, cfg).fallbacks
    for nll_on_prompt in (False, True):
        ref_m, ref_g = training_step(model, tok, chunked, rows, nll_on_prompt)
        m, grads = training_step(model, tok, liger, rows, nll_on_prompt)
        report[f"nll_on_prompt={nll_on_prompt}"] = {
            "metrics": {k: rel(torch.as_tensor(m[k]), torch.as_tensor(ref_m[k])) for k in
                        ("loss", "nll_loss", "log_odds_ratio", "logps/chosen", "logps/rejected", "logits/chosen",
                         "logits/rejected")},
            "grads": max(rel(grads[n], ref_g[n]) for n in ref_g)}
    # A head with a bias and a logit multiplier / divisor (Phi-2, Cohere, Granite), per-token upstream gradients.
    hidden = torch.randn(9, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    bias = torch.randn(37, generator=g, requires_grad=True)
    targets = torch.randint(0, 37, (9,), generator=g)
    upstream = torch.randn(9, generator=g)
    head = LmHead(weight, bias, multiplier=1.5, divisor=4.0)
    results = []
    for fn in (lambda: liger_target_logps(hidden, head, targets),
               lambda: chunked_target_logps(hidden, head, targets, 4)):
        hidden.grad = weight.grad = bias.grad = None
        logps, sums = fn()
        (logps * upstream).sum().backward()
        results.append((logps.detach(), sums, hidden.grad.clone(), weight.grad.clone(), bias.grad.clone()))
    report["scaled_head"] = [rel(a, b) for a, b in zip(*results)]
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
