r"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
https://arxiv.org/abs/2405.14734): reference-free, length-normalised, with a target reward margin.

With logp̄(y|x) = 1/|y| * sum_t log p(y_t | x, y_<t) (the mean per-token log-prob the forward gives):

    L_SimPO = -log sigmoid( beta * (logp̄(y_w|x) - logp̄(y_l|x)) - gamma )

``simpo.alpha`` > 0 adds alpha x the chosen NLL (TRL's CPO-SimPO); 0 is the paper's SimPO. This is TRL's
``CPOTrainer`` with ``loss_type="simpo"``, ``simpo_gamma=gamma``, ``cpo_alpha=alpha``, which averages the
log-probs for this loss type (``average_log_prob=True``), as here.

Pure module: torch only (no ray / deepspeed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from orpo_ray.forward.logprobs import PolicyOutputs
from orpo_ray.objectives.base import SigmoidPreference


@dataclass(frozen=True, kw_only=True)
class SimPO(SigmoidPreference):
    """``objective: simpo`` with ``simpo.beta``, ``simpo.gamma``, ``simpo.alpha``."""

    name: ClassVar[str] = "simpo"

    @classmethod
    def from_config(cls, cfg: Any) -> "SimPO":
        s = cfg.simpo
        return cls(beta=s.beta, gamma=s.gamma, alpha=s.alpha)

    def sequence_logps(self, out: PolicyOutputs) -> tuple[Tensor, Tensor]:
        return out.chosen_logps, out.rejected_logps  # length-normalised: the paper's reward / beta
