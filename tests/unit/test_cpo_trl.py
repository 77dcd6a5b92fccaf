"""SimPO and CPO against TRL's CPOTrainer (loss_type "simpo" and "sigmoid"): TRL's own forward, log-prob,
loss and metric code (CPOTrainer.get_batch_loss_metrics -> concatenated_forward -> get_batch_logps -> cpo_loss)
runs unbound on a stand-in ``self`` with a tiny random-init Llama and the same padded batch as ours; no trainer
is built (that needs a dataset and tokenizer and takes seconds). fp32, rel 1e-5.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import pytest
import torch

from orpo_ray.forward.logprobs import policy_forward
from orpo_ray.objectives.cpo import CPO
from orpo_ray.objectives.simpo import SimPO
from tests.unit.test_logprobs import PAD, PAIRS, make_batch, tiny_llama

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")


def trl_loss_and_metrics(model, batch: dict, loss_type: str, beta: float, alpha: float, gamma: float = 0.0):
    """TRL's CPOTrainer.get_batch_loss_metrics on the batch of ``make_batch`` (chosen rows, then rejected)."""
    b, ids = batch["num_pairs"], batch["input_ids"]
    labels = torch.where(batch["response_mask"], ids, -100)  # TRL's tokenize_row masks prompt and padding
    trl_batch = {"chosen_input_ids": ids[:b], "chosen_attention_mask": batch["attention_mask"][:b],
                 "chosen_labels": labels[:b], "rejected_input_ids": ids[b:],
                 "rejected_attention_mask": batch["attention_mask"][b:], "rejected_labels": labels[b:]}
    cls = trl_cpo.CPOTrainer
    trainer = SimpleNamespace(
        beta=beta, loss_type=loss_type, cpo_alpha=alpha, simpo_gamma=gamma, label_smoothing=0.0, alpha=0.0,
        is_encoder_decoder=False, aux_loss_enabled=False, pad_token_id=PAD,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps)
    trainer.concatenated_forward = functools.partial(cls.concatenated_forward, trainer)
    trainer.cpo_loss = functools.partial(cls.cpo_loss, trainer)
    loss, metrics = cls.get_batch_loss_metrics(trainer, model, trl_batch)
    return loss.item(), metrics


def _ours(objective, model, batch):
    with torch.no_grad():
        loss, metrics = objective.loss(policy_forward(model, batch))
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def _response_logit_means(model, batch) -> dict[str, float]:
    """Our logits/* are means over response-predicting positions; TRL's over every position (prompt and padding
    included). The reference applies our mask to the same model's logits (as the ORPO parity test does)."""
    b = batch["num_pairs"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicts = batch["response_mask"][:, 1:]
    return {name: logits[rows, :-1][predicts[rows]].mean().item()
            for name, rows in (("logits/chosen", slice(0, b)), ("logits/rejected", slice(b, None)))}


def relative_differences(objective, loss_type: str, seed: int = 0) -> dict[str, float]:
    """|ours - TRL| / |TRL| for the loss and every metric both report (used by the test and the README figures)."""
    model, batch = tiny_llama(), make_batch(PAIRS, extra_pad=2)
    torch.manual_seed(seed)
    for p in model.parameters():  # larger than the default init, so log-probs differ between sequences
        p.data.add_(torch.randn_like(p) * 0.2)
    trl_loss, trl_metrics = trl_loss_and_metrics(model, batch, loss_type, objective.beta, objective.alpha,
                                                 getattr(objective, "gamma", 0.0))
    loss, metrics = _ours(objective, model, batch)
    trl_metrics = {**trl_metrics, **_response_logit_means(model, batch), "loss": trl_loss}
    if objective.alpha == 0:  # TRL logs nll_loss = 0 when it does not compute the NLL; we log the real one
        assert trl_metrics["nll_loss"] == 0.0
        del trl_metrics["nll_loss"]
    assert set(trl_metrics) <= set(metrics)
    return {k: abs(metrics[k] - v) / max(abs(v), 1e-12) for k, v in trl_metrics.items()}


@pytest.mark.parametrize("objective, loss_type", [
    (SimPO(beta=2.0, gamma=1.0, alpha=0.0), "simpo"),    # the paper's SimPO
    (SimPO(beta=2.5, gamma=0.5, alpha=0.5), "simpo"),    # TRL's CPO-SimPO (with NLL)
    (CPO(beta=0.1, alpha=1.0), "sigmoid"),
    (CPO(beta=0.5, alpha=0.0), "sigmoid"),
])
def test_agrees_with_trl_cpo_trainer(objective, loss_type):
    diffs = relative_differences(objective, loss_type)
    assert max(diffs.values()) < 1e-5, diffs
