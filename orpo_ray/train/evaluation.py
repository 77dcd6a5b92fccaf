"""Evaluation on the held-out pairs, pooled over all ranks (used by the training loop and `orpo-ray eval`)."""

from __future__ import annotations

import itertools

import torch

from orpo_ray.config import Config
from orpo_ray.forward.layouts import make_collate, make_token_stats, matmul_rows
from orpo_ray.forward.logprobs import nll_target_mask, policy_forward
from orpo_ray.objectives import NLL_METRIC, Objective, build_objective
from orpo_ray.precision import autocast_context
from orpo_ray.results import with_prefix
from orpo_ray.train.metrics import MetricAverager
from orpo_ray.train.runtime import WorkerRuntime


@torch.no_grad()
def evaluate(model, runtime: WorkerRuntime, cfg: Config, precision: str, pad_id: int) -> dict:
    """The objective's loss and metrics on this rank's eval rows, averaged over ranks, with the `eval_` prefix.

    Per-pair metrics are means over pairs and the NLL a mean over tokens, both over the whole eval set, so the
    figures do not depend on the batch size or the number of ranks; the objective assembles `eval_loss` from
    those parts (``Objective.eval_loss``).
    """
    objective = build_objective(cfg)
    model.eval()
    averager = MetricAverager()
    batches = runtime.eval_batches()
    if cfg.train.eval_max_batches is not None:
        batches = itertools.islice(batches, cfg.train.eval_max_batches)
    nll_on_prompt = objective.nll_on_prompt
    collate = make_collate(cfg, pad_id, matmul_rows(model, precision, runtime.device))
    token_stats = make_token_stats(cfg, nll_on_prompt)
    for rows in batches:
        batch = to_device(collate(rows), runtime.device)
        with autocast_context(precision, runtime.device):
            out = policy_forward(model, batch, nll_on_prompt, token_stats=token_stats)
        _, metrics = objective.loss(out)
        nll, _ = metrics.pop(NLL_METRIC), metrics.pop("loss")
        averager.add(metrics, weight=batch["num_pairs"])  # the last eval batch may be short
        averager.add({NLL_METRIC: nll}, weight=float(nll_target_mask(batch, nll_on_prompt).sum()))
    reduced = reduce_metrics(averager, runtime, objective)
    if not reduced:  # no rank had an eval batch: there is nothing to report (and no loss to assemble)
        return {}
    reduced["loss"] = objective.eval_loss(reduced)
    return with_prefix(reduced, "eval_")


def reduce_metrics(averager: MetricAverager, runtime: WorkerRuntime, objective: Objective) -> dict:
    """Exact means over all ranks: sums and counts of the objective's metrics are all-reduced, then divided."""
    packed = runtime.all_reduce_sum(averager.as_tensor(objective.metric_names))
    return MetricAverager.from_tensor(packed, objective.metric_names).compute()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
