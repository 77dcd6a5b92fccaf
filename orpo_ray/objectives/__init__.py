"""Preference objectives behind one interface (``base.Objective``), chosen by the config's ``objective`` key.

A new objective = one file with an ``Objective`` subclass + an entry in ``OBJECTIVES`` below + its config
section (named like the objective; ``config.Config.objective`` lists the choices, a unit test keeps the two
lists equal).
"""

from __future__ import annotations

from typing import Any

from orpo_ray.objectives.base import NLL_METRIC, Objective, step_nll_weights
from orpo_ray.objectives.cpo import CPO
from orpo_ray.objectives.orpo import ORPO
from orpo_ray.objectives.simpo import SimPO

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (ORPO, SimPO, CPO)}

__all__ = ["NLL_METRIC", "OBJECTIVES", "Objective", "build_objective", "get_objective", "step_nll_weights"]


def get_objective(name: str) -> type[Objective]:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective={name!r} is not one of {sorted(OBJECTIVES)}") from None


def build_objective(cfg: Any) -> Objective:
    """The objective ``cfg.objective`` names, with its section's hyper-parameters."""
    return get_objective(cfg.objective).from_config(cfg)
