"""The objective seam: registry and config, SimPO/CPO hand-worked numbers, and the eval loss assembled from
pooled metrics equal to the loss of one batch holding every eval pair (for each objective)."""

from __future__ import annotations

import dataclasses
import math
import typing
from types import SimpleNamespace

import pytest
import torch

from orpo_ray.config import Config, ConfigError, load_config
from orpo_ray.forward.logprobs import PolicyOutputs, policy_forward
from orpo_ray.objectives import OBJECTIVES, build_objective, get_objective
from orpo_ray.objectives.cpo import CPO
from orpo_ray.objectives.orpo import ORPO, orpo_loss
from orpo_ray.objectives.simpo import SimPO
from orpo_ray.train.evaluation import evaluate
from tests.unit.test_logprobs import PAD, PAIRS, make_batch, tiny_llama


def _outputs(chosen, rejected, nll, chosen_tokens, rejected_tokens) -> PolicyOutputs:
    f = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    return PolicyOutputs(f(chosen), f(rejected), f(nll), f(0.25), f(-0.25), f(chosen_tokens), f(rejected_tokens))


def test_registry_and_config_choices_agree():
    choices = typing.get_args(typing.get_type_hints(Config)["objective"])
    assert sorted(choices) == sorted(OBJECTIVES)
    for name, cls in OBJECTIVES.items():
        assert cls.name == name and hasattr(Config(), name)  # each objective reads the section of its name
        assert cls.metric_names[-1] == "loss" and len(set(cls.metric_names)) == len(cls.metric_names)
    with pytest.raises(ValueError, match="objective='dpo'"):
        get_objective("dpo")


def test_objective_key_is_typed_and_documented():
    assert isinstance(build_objective(load_config(None)), ORPO)  # the default
    with pytest.raises(ConfigError, match=r"objective must be one of \['orpo', 'simpo', 'cpo'\], got 'dpo'"):
        load_config(None, ["objective=dpo"])
    cfg = load_config(None, ["objective=simpo", "simpo.beta=2.5", "simpo.gamma=1.4", "simpo.alpha=0.2"])
    assert build_objective(cfg) == SimPO(beta=2.5, gamma=1.4, alpha=0.2)
    assert build_objective(load_config(None, ["objective=cpo", "cpo.beta=0.2", "cpo.alpha=0.5"])) == CPO(
        beta=0.2, alpha=0.5)
    for key in ("simpo.beta", "simpo.alpha", "cpo.beta", "cpo.alpha"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["objective=cpo", f"{key}=-1"])
    with pytest.raises(ConfigError, match=r"tune\.gamma"):
        load_config(None, ["tune.gamma=[0.5]"])  # gamma is SimPO's
    load_config(None, ["objective=simpo", "tune.gamma=[0.5, 1.0]"])


def test_simpo_hand_worked():
    # mean log-probs: chosen -1, rejected -2 (lengths do not matter); beta 2, gamma 1:
    # z = 2 * (-1 - (-2)) - 1 = 1; L = -log sigmoid(1) = log(1 + e^-1) = 0.31326169
    # alpha 0.5, NLL 2 -> loss = 0.31326169 + 1
    out = _outputs([-1.0], [-2.0], nll=2.0, chosen_tokens=[7.0], rejected_tokens=[3.0])
    loss, m = SimPO(beta=2.0, gamma=1.0, alpha=0.5).loss(out)
    pref = math.log1p(math.exp(-1.0))
    assert loss.item() == pytest.approx(pref + 1.0, rel=1e-6)
    expected = {"rewards/chosen": -2.0, "rewards/rejected": -4.0, "rewards/accuracies": 1.0, "rewards/margins": 2.0,
                "logps/chosen": -1.0, "logps/rejected": -2.0, "logits/chosen": 0.25, "logits/rejected": -0.25,
                "nll_loss": 2.0, "preference_loss": pref, "loss": pref + 1.0}
    assert {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()} == {k: v.item() for k, v in m.items()}
    assert sorted(m) == sorted(SimPO.metric_names)


def test_cpo_compares_summed_log_probs_hand_worked():
    # chosen: mean -0.5 over 4 tokens = sum -2; rejected: mean -1 over 1 token = sum -1.
    # The means favour the chosen (+0.5), the sums the rejected (-1): CPO uses the sums, like TRL's "sigmoid".
    # beta 0.1: L = -log sigmoid(0.1 * (-2 - (-1))) = log(1 + e^0.1) = 0.74439666; alpha 1, NLL 1.5
    out = _outputs([-0.5], [-1.0], nll=1.5, chosen_tokens=[4.0], rejected_tokens=[1.0])
    loss, m = CPO(beta=0.1, alpha=1.0).loss(out, nll_weight=2.0)  # the weight scales the NLL term and its log
    pref = math.log1p(math.exp(0.1))
    assert loss.item() == pytest.approx(pref + 3.0, rel=1e-6)
    expected = {"rewards/chosen": -0.2, "rewards/rejected": -0.1, "rewards/accuracies": 0.0, "rewards/margins": -0.1,
                "logps/chosen": -2.0, "logps/rejected": -1.0, "logits/chosen": 0.25, "logits/rejected": -0.25,
                "nll_loss": 3.0, "preference_loss": pref, "loss": pref + 3.0}
    assert {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()} == {k: v.item() for k, v in m.items()}


def test_cpo_needs_token_counts():
    out = PolicyOutputs(*(torch.tensor([-1.0]),) * 2, *(torch.tensor(1.0),) * 3)
    with pytest.raises(ValueError, match="chosen_tokens"):
        CPO(beta=0.1, alpha=1.0).loss(out)


def test_orpo_objective_is_orpo_loss():
    out = _outputs([-1.0, -0.3], [-2.0, -0.2], nll=1.2, chosen_tokens=[3.0, 2.0], rejected_tokens=[2.0, 5.0])
    loss, m = ORPO(beta=0.3).loss(out, nll_weight=0.5)
    ref_loss, ref_m = orpo_loss(out, 0.3, 0.5)
    assert loss.item() == ref_loss.item() and {k: v.item() for k, v in m.items()} == {
        k: v.item() for k, v in ref_m.items()}


@pytest.mark.parametrize("objective", [ORPO(beta=0.3), SimPO(beta=2.0, gamma=0.4, alpha=0.6), CPO(beta=0.1, alpha=0.7)],
                         ids=repr)
def test_loss_is_the_mean_of_its_pair_terms_plus_the_weighted_nll(objective):
    """The split the fused lm-head sums group by group (forward/fused_loss.py); worked by hand for ORPO."""
    out = _outputs([-1.0, -0.3], [-2.0, -0.2], nll=1.2, chosen_tokens=[3.0, 2.0], rejected_tokens=[2.0, 5.0])
    loss, _ = objective.loss(out, nll_weight=0.5)
    split = objective.preference_terms(out).mean() + objective.nll_coefficient * 0.5 * out.nll
    torch.testing.assert_close(loss, split, rtol=1e-6, atol=1e-7)
    if isinstance(objective, ORPO):  # log odds(p) = log p - log(1 - p); L_OR = log(1 + exp(-ratio))
        lo = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
        terms = [0.3 * math.log1p(math.exp(-(lo(c) - lo(r)))) for c, r in ((-1.0, -2.0), (-0.3, -0.2))]
        torch.testing.assert_close(objective.preference_terms(out), torch.tensor(terms), rtol=1e-6, atol=1e-7)


def _rows(pairs):
    return [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]


@pytest.mark.parametrize("overrides", [["objective=orpo", "orpo.beta=0.4"],
                                       ["objective=simpo", "simpo.alpha=0.3"], ["objective=cpo", "cpo.alpha=0.7"]])
def test_eval_loss_from_pooled_metrics_is_the_loss_of_the_whole_eval_set(overrides):
    """evaluate() pools per-pair metrics over pairs and the NLL over tokens, in batches of 2 + 1 pairs, and
    the objective rebuilds the loss: it must equal the loss and metrics of one batch of all 3 pairs.
    (Not logits/*: a per-batch mean over positions, pooled per pair, is a logging figure, not a loss term.)"""
    cfg = load_config(None, [*overrides, "train.per_device_batch_size=2"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    model = tiny_llama()
    runtime = SimpleNamespace(device=torch.device("cpu"), all_reduce_sum=lambda t: t,
                              eval_batches=lambda: iter([_rows(PAIRS[:2]), _rows(PAIRS[2:])]))
    pooled = evaluate(model, runtime, cfg, "fp32", PAD)
    with torch.no_grad():
        _, whole = build_objective(cfg).loss(policy_forward(model, make_batch(PAIRS)))
    assert {k: v for k, v in pooled.items() if "logits/" not in k} == {
        f"eval_{k}": pytest.approx(v.item(), rel=1e-5, abs=1e-6) for k, v in whole.items() if "logits/" not in k}
