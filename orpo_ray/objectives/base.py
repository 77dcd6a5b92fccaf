"""The objective seam: what the training loop and evaluation need from a preference objective.

An objective turns one forward pass (``PolicyOutputs``: per-pair mean log-probs, response token counts, the
chosen NLL) into a loss and detached metrics, names its metrics, and assembles the held-out loss from metrics
pooled over the whole eval set. The loop and evaluation call these and nothing else, so a new objective is one
file (a subclass of ``Objective``) plus a registry entry in ``objectives/__init__.py`` and its config section.

Pooling contract (evaluation): ``nll_loss`` is pooled over NLL tokens, every other metric over pairs, and
``loss`` is dropped and rebuilt by ``eval_loss`` from the pooled parts, so held-out figures do not depend on the
batch size or the number of ranks. An objective therefore logs each term of its loss as its own per-pair mean.

Pure module: torch only (no ray / deepspeed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from orpo_ray.forward.logprobs import PolicyOutputs

NLL_METRIC = "nll_loss"

# Logged by every objective, under the names TRL's ORPOTrainer and CPOTrainer share, in their logging order.
SHARED_METRIC_NAMES: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/rejected",
    "logps/chosen",
    "logits/rejected",
    "logits/chosen",
    NLL_METRIC,
)


@dataclass(frozen=True, kw_only=True)
class Objective(ABC):
    """One preference objective with its hyper-parameters (built from the config by ``from_config``).

    beta: the objective's preference weight / temperature (ORPO's λ, SimPO's and CPO's β); ``tune.beta``
        sweeps it. nll_on_prompt: whether the NLL term also covers prompt tokens (an argument of the forward).
    """

    name: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]  # what ``loss`` returns; every rank all-reduces them in this order
    beta: float
    nll_on_prompt: bool = False

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any) -> "Objective":
        """This objective with the hyper-parameters of its config section (``cfg.<name>``)."""

    @abstractmethod
    def loss(self, out: PolicyOutputs, nll_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, detached fp32 0-d metrics named ``metric_names``) for one micro-batch.

        nll_weight: 1 for a batch on its own; in training, this micro-batch's share of the step's NLL tokens
        (``step_nll_weights``), applied to the NLL term and to the logged ``nll_loss`` alike.
        """

    @abstractmethod
    def eval_loss(self, pooled: Mapping[str, float]) -> float:
        """The held-out loss from metrics pooled over the eval set (see the pooling contract above)."""

    # The loss split by pair: loss(out, w) = mean(preference_terms(out)) + nll_coefficient * w * out.nll. The
    # fused lm-head (forward/fused_loss.py) sums it over groups of whole pairs, so it can take each group's
    # gradient while that group's logits are still in memory; tests/unit/test_objectives.py holds every objective
    # to this identity.
    @property
    @abstractmethod
    def nll_coefficient(self) -> float:
        """Weight of the (token-mean, weighted) NLL in the loss."""

    @abstractmethod
    def preference_terms(self, out: PolicyOutputs) -> Tensor:
        """[B] each pair's preference term of the loss (fp32, differentiable); ``out.nll`` is not read."""


def step_nll_weights(micro_batch_tokens: list[float], step_tokens: float, micro_batches_in_step: int) -> list[float]:
    """Weights that turn per-micro-batch token-mean NLLs into the token mean of the whole optimizer step.

    A step averages its losses over ``micro_batches_in_step`` = gradient accumulation steps x ranks (DeepSpeed and
    DDP divide by both). Averaging per-micro-batch token means would weight a token in a short micro-batch more
    than one in a long micro-batch, so 2 ranks x 4 pairs would not train like 1 rank x 8 (and accumulation would
    not equal a bigger batch). With weight_i = n_i * M / N (n_i: this micro-batch's NLL tokens, N: the step's, over
    all ranks), mean_i(weight_i * nll_i) = sum_i(n_i * nll_i) / N: the token mean over the step, exactly.
    The weights average to 1, so the NLL keeps its scale. Preference terms are per-pair means and need no
    weighting: every micro-batch of a training step holds the same number of pairs.
    """
    if step_tokens <= 0:
        return [1.0] * len(micro_batch_tokens)
    return [n * micro_batches_in_step / step_tokens for n in micro_batch_tokens]


def shared_metrics(out: PolicyOutputs, beta: float, chosen: Tensor, rejected: Tensor, nll: Tensor) -> dict[str, Tensor]:
    """The ``SHARED_METRIC_NAMES`` metrics, with rewards = beta * the log-probs the objective compares.

    chosen / rejected: [B] fp32 sequence log-probs as the objective uses them (means for ORPO and SimPO, sums
    for CPO, as TRL logs them). Accuracy compares the log-probs, not beta * log-probs, so it stays meaningful
    at beta = 0 (TRL compares the rewards; the same for beta > 0). nll: the logged (weighted) NLL.
    """
    with torch.no_grad():
        return {
            "rewards/chosen": beta * chosen.mean(),
            "rewards/rejected": beta * rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": beta * (chosen - rejected).mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(),
            "logits/chosen": out.chosen_logits_mean,
            "logits/rejected": out.rejected_logits_mean,
            NLL_METRIC: nll,
        }


def as_metrics(metrics: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached fp32 0-d tensors (what the metric averager and the all-reduce expect)."""
    return {k: v.detach().float().reshape(()) for k, v in metrics.items()}


PREFERENCE_METRIC = "preference_loss"

# SimPO and CPO (TRL's CPOTrainer family): the shared names plus the per-pair preference term and the total.
SIGMOID_METRIC_NAMES: tuple[str, ...] = (*SHARED_METRIC_NAMES, PREFERENCE_METRIC, "loss")


@dataclass(frozen=True, kw_only=True)
class SigmoidPreference(Objective):
    """loss = mean(-logsigmoid(beta * (logp_w - logp_l) - gamma)) + alpha * NLL(chosen): TRL's CPOTrainer family.

    Subclasses say which sequence log-probs they compare (``sequence_logps``). This is TRL's
    ``CPOTrainer.cpo_loss`` for loss_type "sigmoid" (gamma = 0) and "simpo" (TRL subtracts gamma / beta before
    multiplying by beta: the same number), without label smoothing, plus ``cpo_alpha`` x NLL.
    ``preference_loss`` logs the first term (a per-pair mean, so evaluation can pool it); ``nll_loss`` logs the
    weighted NLL whatever alpha is (TRL logs 0 when cpo_alpha is 0; here the chosen NLL stays visible for free).
    """

    metric_names: ClassVar[tuple[str, ...]] = SIGMOID_METRIC_NAMES
    alpha: float = 0.0
    gamma: float = 0.0

    @abstractmethod
    def sequence_logps(self, out: PolicyOutputs) -> tuple[Tensor, Tensor]:
        """([B] chosen, [B] rejected) fp32 sequence log-probs the preference term compares."""

    @property
    def nll_coefficient(self) -> float:
        return self.alpha

    def preference_terms(self, out: PolicyOutputs) -> Tensor:
        return self._terms(*(x.float() for x in self.sequence_logps(out)))

    def _terms(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return -F.logsigmoid(self.beta * (chosen - rejected) - self.gamma)

    def loss(self, out: PolicyOutputs, nll_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = (x.float() for x in self.sequence_logps(out))
        preference = self._terms(chosen, rejected).mean()
        nll = out.nll.float() * nll_weight
        loss = preference + self.alpha * nll
        metrics = shared_metrics(out, self.beta, chosen, rejected, nll)
        metrics.update({PREFERENCE_METRIC: preference, "loss": loss})
        return loss, as_metrics(metrics)

    def eval_loss(self, pooled: Mapping[str, float]) -> float:
        return pooled[PREFERENCE_METRIC] + self.alpha * pooled[NLL_METRIC]
