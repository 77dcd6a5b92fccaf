r"""ORPO maths on length-normalised log-probs (Hong et al. 2024, "ORPO: Monolithic Preference Optimization
without Reference Model", https://arxiv.org/abs/2403.07691).

With x the prompt, y_w the chosen and y_l the rejected response, and the length-normalised likelihood

    log P(y|x) = 1/|y| * sum_t log p(y_t | x, y_<t)                  (mean per-token log-prob)

the paper defines

    L_SFT  = -1/|y_w| * sum_t log p(y_w,t | x, y_w,<t)               (NLL of the chosen response)
    odds(y|x) = P(y|x) / (1 - P(y|x))
    L_OR   = -log sigmoid( log( odds(y_w|x) / odds(y_l|x) ) )
    L_ORPO = E_(x, y_w, y_l) [ L_SFT + beta * L_OR ]                  (the paper's lambda is our ``beta``)

log odds are computed from log P without leaving log space:
log odds = log P - log(1 - P) = log P - log1mexp(log P).

``nll_on_prompt`` (an argument of ``logprobs.policy_forward``, not of this module): TRL's ORPOTrainer takes
L_SFT as the cross-entropy over prompt *and* response tokens of the chosen rows; the paper's L_SFT is over the
response. We default to the response only (``nll_on_prompt=False``); ``True`` reproduces TRL.

Pure module: torch only (no ray / deepspeed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from orpo_ray.forward.logprobs import PolicyOutputs
from orpo_ray.objectives.base import NLL_METRIC, SHARED_METRIC_NAMES, Objective, as_metrics, shared_metrics

_NEG_LN2 = -math.log(2.0)

# What ``orpo_loss`` returns: TRL's ORPOTrainer names (plus ``loss``), in TRL's logging order.
ORPO_METRIC_NAMES: tuple[str, ...] = (*SHARED_METRIC_NAMES, "log_odds_ratio", "log_odds_chosen", "loss")

# Upper clamp of the mean log-prob in ``log_odds``; see its docstring.
MAX_MEAN_LOGP = -1e-6


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation (Maechler 2012).

    Near 0 (x > -ln 2) ``log(-expm1(x))`` is accurate; further out ``log1p(-exp(x))`` is. x = 0 gives -inf.

    Both branches of ``torch.where`` are evaluated and differentiated everywhere; an unselected branch that
    produces inf/NaN still poisons the gradient (0 * inf = NaN): e.g. at x = -1e-30 the unused far branch is
    log1p(-1) = -inf. So each branch gets a safe stand-in input (-1, finite in both) where it is not selected
    (for the near branch this only matters for x > 0, outside the domain, but it keeps the function NaN-safe).
    """
    near_zero = x > _NEG_LN2
    safe = torch.full_like(x, -1.0)
    near = torch.log(-torch.expm1(torch.where(near_zero, x, safe)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, safe, x)))
    return torch.where(near_zero, near, far)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log(p / (1 - p)) with p = exp(mean_logps), in (at least) fp32.

    Inputs are clamped to at most ``MAX_MEAN_LOGP`` = -1e-6 (p <= 1 - 1e-6), so the result is <= ~13.8.
    Why: at mean_logps = 0 (every response token predicted with certainty, easily reached by fp32 rounding of
    a confident model) the odds are infinite and the loss/gradient would be inf/NaN. The clamp makes the value
    finite and the gradient exactly 0 beyond it — a response that is already certain needs no push; below the
    clamp the gradient 1/(1-p) is at most ~1e6. Finite with finite gradients on all of [-1e4, 0].
    """
    x = mean_logps.to(torch.promote_types(mean_logps.dtype, torch.float32)).clamp(max=MAX_MEAN_LOGP)
    return x - log1mexp(x)


def log_odds_ratio(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> Tensor:
    """Per-example log(odds(chosen) / odds(rejected)); TRL logs its mean as ``log_odds_chosen``."""
    return log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)


def odds_ratio_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> Tensor:
    """Per-example L_OR = -log sigmoid(log odds ratio), shape [B]."""
    return -F.logsigmoid(log_odds_ratio(chosen_mean_logps, rejected_mean_logps))


def orpo_loss(out: PolicyOutputs, beta: float, nll_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """L_ORPO = nll_weight * nll + beta * mean(L_OR) and detached fp32 0-d metrics under TRL's names.

    beta: weight of the odds-ratio term (the paper's lambda; TRL's default 0.1). beta = 0 is plain SFT.
    nll_weight: 1 for one batch on its own; in training, this micro-batch's share of the step's NLL tokens
        (``objectives.step_nll_weights``), so the NLL is a token mean over the whole optimizer step. ``nll_loss``
        is logged weighted too: its mean over the step's micro-batches is then the step's token-mean NLL.
    Returns (loss, metrics); metric names are ``ORPO_METRIC_NAMES``.
    """
    chosen, rejected = out.chosen_logps.float(), out.rejected_logps.float()
    ratio = log_odds_ratio(chosen, rejected)
    log_sig = F.logsigmoid(ratio)  # = -L_OR, logged as ``log_odds_ratio`` like TRL
    nll = out.nll.float() * nll_weight
    loss = nll + beta * (-log_sig).mean()
    metrics = shared_metrics(out, beta, chosen, rejected, nll)
    metrics.update({"log_odds_ratio": log_sig.mean(), "log_odds_chosen": ratio.mean(), "loss": loss})
    return loss, as_metrics(metrics)


@dataclass(frozen=True, kw_only=True)
class ORPO(Objective):
    """ORPO (``objective: orpo``): ``orpo_loss`` with ``orpo.beta`` (λ) and ``orpo.nll_on_prompt``."""

    name: ClassVar[str] = "orpo"
    metric_names: ClassVar[tuple[str, ...]] = ORPO_METRIC_NAMES

    @classmethod
    def from_config(cls, cfg: Any) -> "ORPO":
        return cls(beta=cfg.orpo.beta, nll_on_prompt=cfg.orpo.nll_on_prompt)

    nll_coefficient: ClassVar[float] = 1.0  # L_SFT + beta * L_OR

    def preference_terms(self, out: PolicyOutputs) -> Tensor:
        return self.beta * odds_ratio_loss(out.chosen_logps.float(), out.rejected_logps.float())

    def loss(self, out: PolicyOutputs, nll_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        return orpo_loss(out, self.beta, nll_weight)

    def eval_loss(self, pooled: Mapping[str, float]) -> float:
        # log_odds_ratio is mean(log sigmoid(ratio)) = -mean(L_OR), so this is L_SFT + beta * mean(L_OR) again.
        return pooled[NLL_METRIC] - self.beta * pooled["log_odds_ratio"]
