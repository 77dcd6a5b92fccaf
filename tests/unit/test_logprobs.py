"""Per-token log-probs, masking, padding invariance, and end-to-end agreement with TRL's ORPO maths."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from orpo_ray.forward.logprobs import masked_mean, nll_target_mask, policy_forward, token_logps
from orpo_ray.objectives import step_nll_weights
from orpo_ray.objectives.orpo import orpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

PAD = 0
Pair = tuple[list[int], list[int], list[int]]  # prompt_ids, chosen_ids, rejected_ids


def make_batch(pairs: list[Pair], extra_pad: int = 0) -> dict:
    """The padded layout of docs/architecture.md (chosen rows, then rejected rows, right-padded)."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(y) for p, y in rows) + extra_pad
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        attention_mask[i, :n] = 1
        response_mask[i, len(prompt) : n] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "num_pairs": len(pairs),
    }


class FixedLogits(torch.nn.Module):
    """Stand-in model returning given logits (as a parameter, so gradients can be checked)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask, use_cache):
        assert use_cache is False and input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def tiny_llama(vocab: int = 32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


PAIRS: list[Pair] = [
    ([1, 5, 6], [7, 8, 2], [9, 2]),
    ([1, 10], [11, 12, 13, 14, 2], [15, 2]),
    ([1, 3, 4, 5, 6], [2], [16, 17, 18, 2]),
]


def test_token_logps_hand_computed():
    # vocab 3; logits at t=0: [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]; token 1 is id 2 -> ln(1/2)
    #          logits at t=1: [ln 3, 0, 0] -> softmax [3/5, 1/5, 1/5]; token 2 is id 0 -> ln(3/5)
    # the logits at t=2 predict nothing; entry 0 has no predictor -> 0
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0], [5.0, -5.0, 1.0]]])
    ids = torch.tensor([[1, 2, 0]])
    torch.testing.assert_close(token_logps(logits, ids), torch.tensor([[0.0, math.log(0.5), math.log(0.6)]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_token_logps_matches_log_softmax_values_and_gradients(dtype, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen) * 4).to(dtype).requires_grad_()
    ids = torch.randint(0, 11, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen)

    ours = token_logps(logits, ids, chunk_rows=chunk_rows)
    assert ours.dtype == torch.float32
    (ours * weights).sum().backward()
    grad_ours, logits.grad = logits.grad, None

    ref = F.log_softmax(logits.float()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (ref * weights[:, 1:]).sum().backward()
    torch.testing.assert_close(ours[:, 0], torch.zeros(3))
    torch.testing.assert_close(ours[:, 1:], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, logits.grad)


def test_token_logps_float64_gradcheck():
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    assert torch.autograd.gradcheck(lambda x: token_logps(x, ids, chunk_rows=3), (logits,))


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([2.0, 0.0]))  # empty row -> 0, not NaN
    torch.testing.assert_close(masked_mean(values, mask, dim=None), torch.tensor(2.0))


def test_padding_does_not_change_outputs():
    model = tiny_llama()
    with torch.no_grad():
        tight = policy_forward(model, make_batch(PAIRS))
        loose = policy_forward(model, make_batch(PAIRS, extra_pad=6))
    for name in ("chosen_logps", "rejected_logps", "nll", "chosen_logits_mean", "rejected_logits_mean"):
        torch.testing.assert_close(getattr(loose, name), getattr(tight, name), rtol=1e-5, atol=1e-6, msg=name)


def test_outputs_are_means_over_response_tokens_only():
    model = tiny_llama()
    batch = make_batch(PAIRS)
    out = policy_forward(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b = len(PAIRS)
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        for row, response, got in ((i, chosen, out.chosen_logps[i]), (b + i, rejected, out.rejected_logps[i])):
            start = len(prompt)
            positions = range(start, start + len(response))
            logps = [F.log_softmax(logits[row, t - 1], -1)[batch["input_ids"][row, t]] for t in positions]
            assert got.item() == pytest.approx(torch.stack(logps).mean().item(), rel=1e-5)
    assert out.chosen_logps.shape == out.rejected_logps.shape == (b,)
    assert out.chosen_logps.requires_grad and out.nll.requires_grad and out.nll.shape == ()
    assert not out.chosen_logits_mean.requires_grad


def test_prompt_predictions_do_not_enter_mean_logps_but_enter_nll_on_prompt():
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(PAIRS)
    logits = torch.randn(*batch["input_ids"].shape, 20, generator=gen)
    garbled = logits.clone()
    # Scramble every position whose logits predict a prompt token (t-1 for prompt tokens t >= 1)
    predicts_prompt = torch.zeros_like(batch["response_mask"])
    predicts_prompt[:, :-1] = batch["attention_mask"][:, 1:].bool() & ~batch["response_mask"][:, 1:]
    garbled[predicts_prompt] = torch.randn(int(predicts_prompt.sum()), 20, generator=gen) * 10

    with torch.no_grad():
        a, b = (policy_forward(FixedLogits(x), batch) for x in (logits, garbled))
        a_p, b_p = (policy_forward(FixedLogits(x), batch, nll_on_prompt=True) for x in (logits, garbled))
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps)
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps)
    torch.testing.assert_close(a.nll, b.nll)
    torch.testing.assert_close(a.chosen_logits_mean, b.chosen_logits_mean)
    assert a_p.nll.item() != pytest.approx(b_p.nll.item(), rel=1e-3)


def test_gradients_reach_the_model():
    model = tiny_llama()
    loss, _ = orpo_loss(policy_forward(model, make_batch(PAIRS)), beta=0.1)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_split_step_gives_the_gradient_of_the_whole_batch(nll_on_prompt):
    """Micro-batches of unequal NLL token counts, weighted by step_nll_weights and averaged as an engine averages
    accumulation steps and ranks, give the loss and gradient of one batch holding all the pairs."""
    beta = 0.25
    whole_model, split_model = tiny_llama(), tiny_llama()
    whole, _ = orpo_loss(policy_forward(whole_model, make_batch(PAIRS[:2]), nll_on_prompt), beta)
    whole.backward()

    parts = [make_batch(PAIRS[:1]), make_batch(PAIRS[1:2])]  # 3 and 5 chosen response tokens
    counts = [float(nll_target_mask(b, nll_on_prompt).sum()) for b in parts]
    assert counts[0] != counts[1]
    split = 0.0
    for batch, weight in zip(parts, step_nll_weights(counts, sum(counts), len(parts))):
        loss, _ = orpo_loss(policy_forward(split_model, batch, nll_on_prompt), beta, weight)
        (loss / len(parts)).backward()
        split += loss.item() / len(parts)
    assert split == pytest.approx(whole.item(), rel=1e-6)
    for (name, a), b in zip(whole_model.named_parameters(), split_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def _trl_reference(logits: torch.Tensor, batch: dict, beta: float) -> tuple[float, dict[str, float]]:
    """TRL's get_batch_loss_metrics maths, via its own functions, on the same padded batch."""
    b = batch["num_pairs"]
    ids = batch["input_ids"]
    # concatenated_forward: NLL is cross-entropy over prompt+response of the chosen rows (padding -> -100)
    nll_labels = torch.where(batch["attention_mask"] == 1, ids, -100)
    nll = torch.nn.CrossEntropyLoss()(logits[:b, :-1].reshape(-1, logits.shape[-1]), nll_labels[:b, 1:].reshape(-1))
    # concatenated_labels mask the prompt and padding with -100
    labels = torch.where(batch["response_mask"], ids, -100)
    logps = trl_orpo.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr, ratio, log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, logps[:b], logps[b:])
    # TRL averages logits over *all* positions (prompt and padding included); our metric is defined over
    # response-predicting positions only, so the reference applies that mask to the same logits.
    predicts_response = batch["response_mask"][:, 1:]
    logit_means = [logits[rows, :-1][predicts_response[rows]].mean().item() for rows in (slice(0, b), slice(b, None))]
    metrics = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (cr > rr).float().mean(),
        "rewards/margins": (cr - rr).mean(), "logps/chosen": logps[:b].mean(), "logps/rejected": logps[b:].mean(),
        "logits/chosen": logit_means[0], "logits/rejected": logit_means[1], "nll_loss": nll,
        "log_odds_ratio": ratio, "log_odds_chosen": log_odds, "loss": nll - losses.mean(),
    }
    return float(nll - losses.mean()), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_trl_end_to_end(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(PAIRS, extra_pad=2)
    logits = torch.randn(*batch["input_ids"].shape, 24, generator=gen) * 2
    beta = 0.1

    loss, metrics = orpo_loss(policy_forward(FixedLogits(logits), batch, nll_on_prompt=True), beta)
    trl_loss, trl_metrics = _trl_reference(logits, batch, beta)
    assert loss.item() == pytest.approx(trl_loss, rel=1e-5)
    assert {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in trl_metrics.items()} == {
        k: v.item() for k, v in metrics.items()
    }
