r"""CPO (Xu et al. 2024, "Contrastive Preference Optimization", https://arxiv.org/abs/2401.08417): DPO's
sigmoid loss without a reference model, plus the NLL of the chosen response.

With log π(y|x) = sum_t log p(y_t | x, y_<t) the *summed* log-prob of a response (not length-normalised:
TRL's CPOTrainer with ``loss_type="sigmoid"`` calls ``get_batch_logps(average_log_prob=False)``):

    L_CPO = -log sigmoid( beta * (log π(y_w|x) - log π(y_l|x)) ) + alpha * NLL(y_w)

The NLL is TRL's: token-mean cross-entropy over the chosen responses (prompt tokens masked). The summed
log-prob is the forward's mean x the response's token count. ``rewards/*`` and ``logps/*`` are logged on the
summed log-probs, as TRL logs them.

Pure module: torch only (no ray / deepspeed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from orpo_ray.forward.logprobs import PolicyOutputs
from orpo_ray.objectives.base import SigmoidPreference


@dataclass(frozen=True, kw_only=True)
class CPO(SigmoidPreference):
    """``objective: cpo`` with ``cpo.beta`` and ``cpo.alpha`` (TRL's ``cpo_alpha``); no margin (gamma = 0)."""

    name: ClassVar[str] = "cpo"

    @classmethod
    def from_config(cls, cfg: Any) -> "CPO":
        return cls(beta=cfg.cpo.beta, alpha=cfg.cpo.alpha)

    def sequence_logps(self, out: PolicyOutputs) -> tuple[Tensor, Tensor]:
        if out.chosen_tokens is None or out.rejected_tokens is None:
            raise ValueError("CPO compares summed log-probs and needs PolicyOutputs.chosen_tokens/rejected_tokens")
        return out.chosen_logps * out.chosen_tokens, out.rejected_logps * out.rejected_tokens
