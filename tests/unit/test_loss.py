"""ORPO maths: hand-worked numbers, agreement with TRL, finiteness on extreme inputs."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from orpo_ray.forward.logprobs import PolicyOutputs
from orpo_ray.objectives import step_nll_weights
from orpo_ray.objectives.orpo import ORPO_METRIC_NAMES as TRAIN_METRIC_NAMES
from orpo_ray.objectives.orpo import MAX_MEAN_LOGP, log1mexp, log_odds, odds_ratio_loss, orpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")


def _outputs(chosen, rejected, nll=1.0, requires_grad=False) -> PolicyOutputs:
    c = torch.as_tensor(chosen, dtype=torch.float32).clone().requires_grad_(requires_grad)
    r = torch.as_tensor(rejected, dtype=torch.float32).clone().requires_grad_(requires_grad)
    n = torch.tensor(float(nll), requires_grad=requires_grad)
    return PolicyOutputs(c, r, n, torch.tensor(0.5), torch.tensor(-0.5))


def test_hand_worked_example():
    # chosen: p = 0.5 -> odds = 0.5 / 0.5 = 1    -> log odds = 0
    # rejected: p = 0.2 -> odds = 0.2 / 0.8 = 1/4 -> log odds = ln(1/4)
    # log odds ratio = 0 - ln(1/4) = ln 4; sigmoid(ln 4) = 4 / (1 + 4) = 0.8
    # L_OR = -ln 0.8 = ln 1.25
    # L = nll + beta * L_OR = 2.0 + 0.1 * ln 1.25 = 2.0223143...
    c, r = math.log(0.5), math.log(0.2)
    assert log_odds(torch.tensor(c)).item() == pytest.approx(0.0, abs=1e-6)
    assert log_odds(torch.tensor(r)).item() == pytest.approx(math.log(0.25), rel=1e-6)
    assert odds_ratio_loss(torch.tensor([c]), torch.tensor([r])).item() == pytest.approx(math.log(1.25), rel=1e-6)

    loss, m = orpo_loss(_outputs([c], [r], nll=2.0), beta=0.1)
    assert loss.item() == pytest.approx(2.0 + 0.1 * math.log(1.25), rel=1e-6)
    expected = {
        "rewards/chosen": 0.1 * c,
        "rewards/rejected": 0.1 * r,
        "rewards/accuracies": 1.0,  # ln 0.5 > ln 0.2
        "rewards/margins": 0.1 * (c - r),  # 0.1 * ln 2.5
        "logps/chosen": c,
        "logps/rejected": r,
        "logits/chosen": 0.5,
        "logits/rejected": -0.5,
        "nll_loss": 2.0,
        "log_odds_ratio": math.log(0.8),
        "log_odds_chosen": math.log(4.0),
        "loss": 2.0 + 0.1 * math.log(1.25),
    }
    assert {k: pytest.approx(v, rel=1e-6, abs=1e-7) for k, v in expected.items()} == {
        k: v.item() for k, v in m.items()
    }


def test_metrics_are_detached_scalar_fp32_under_trl_names():
    _, m = orpo_loss(_outputs([-1.0, -2.0], [-3.0, -0.5], requires_grad=True), beta=0.1)
    assert tuple(sorted(m)) == tuple(sorted(TRAIN_METRIC_NAMES))
    for name, value in m.items():
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad, name


def test_beta_zero_is_pure_sft():
    out = _outputs([-1.0, -0.2], [-0.1, -3.0], nll=1.7, requires_grad=True)
    loss, m = orpo_loss(out, beta=0.0)
    assert loss.item() == out.nll.item()
    loss.backward()
    assert out.nll.grad.item() == 1.0
    assert torch.count_nonzero(out.chosen_logps.grad) == 0 and torch.count_nonzero(out.rejected_logps.grad) == 0
    # accuracy compares log-probs, so it is still informative at beta = 0: pair 1 right, pair 0 wrong
    assert m["rewards/accuracies"].item() == 0.5
    assert m["rewards/chosen"].item() == 0.0


def test_odds_ratio_gradient_prefers_chosen():
    # Minimising L_OR must raise the chosen log-prob and lower the rejected one.
    out = _outputs([-1.0], [-1.0], requires_grad=True)
    orpo_loss(out, beta=1.0)[0].backward()
    assert out.chosen_logps.grad.item() < 0 < out.rejected_logps.grad.item()


def test_log1mexp_matches_float64_reference():
    x = -torch.cat([torch.logspace(-7, 2, 200, dtype=torch.float64), torch.tensor([math.log(2.0)], dtype=torch.float64)])
    reference = torch.log(-torch.expm1(x))  # fp64 is accurate enough to be the reference everywhere here
    ours = log1mexp(x.float()).double()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_log1mexp_where_branches_give_finite_gradients():
    # At tiny negatives the *unselected* branch log1p(-exp(x)) is log1p(-1) = -inf with infinite gradient;
    # a plain torch.where would turn 0 * inf into NaN here.
    x = torch.tensor([-1e-30, -1e-20, -1e-7, -math.log(2.0), -0.6931, -0.6932, -50.0, -1e4], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_log_odds_clamp_at_zero():
    x = torch.tensor([0.0, -1e-30, -1e-7, MAX_MEAN_LOGP, -1e-3], requires_grad=True)
    y = log_odds(x)
    y.sum().backward()
    cap = math.log((1 - 1e-6) / 1e-6)  # log odds at p = exp(-1e-6) ~ 13.8155
    assert y[:3].tolist() == pytest.approx([cap] * 3, rel=1e-4)
    assert x.grad[:3].tolist() == [0.0, 0.0, 0.0]  # beyond the clamp: no push
    assert torch.isfinite(x.grad).all() and x.grad[4].item() == pytest.approx(1 / (1 - math.exp(-1e-3)), rel=1e-3)
    assert y.dtype == torch.float32


def test_log_odds_float64_gradcheck():
    ln2 = math.log(2.0)
    x = torch.tensor([-1e-4, -0.3, -ln2 + 1e-3, -ln2 - 1e-3, -2.0, -40.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(log_odds, (x.requires_grad_(),))


def _trl_self(beta: float) -> SimpleNamespace:
    # Just enough of an ORPOTrainer for its maths methods to run unbound (no trainer is built).
    return SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))


def test_agrees_with_trl_odds_ratio_loss():
    gen = torch.Generator().manual_seed(0)
    chosen = -torch.rand(64, generator=gen) * 5 - 1e-3
    rejected = -torch.rand(64, generator=gen) * 5 - 1e-3
    beta = 0.25
    trl_losses, trl_cr, trl_rr, trl_ratio, trl_log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(
        _trl_self(beta), chosen, rejected
    )
    torch.testing.assert_close(trl_orpo.log1mexp(chosen), log1mexp(chosen), rtol=1e-5, atol=1e-6)
    # TRL returns beta * logsigmoid (a reward to subtract); ours is the per-example loss L_OR
    torch.testing.assert_close(odds_ratio_loss(chosen, rejected), -trl_losses / beta, rtol=1e-5, atol=1e-6)

    loss, m = orpo_loss(PolicyOutputs(chosen, rejected, torch.tensor(1.5), torch.tensor(0.0), torch.tensor(0.0)), beta)
    assert loss.item() == pytest.approx(1.5 - trl_losses.mean().item(), rel=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(trl_cr.mean().item(), rel=1e-5)
    assert m["rewards/rejected"].item() == pytest.approx(trl_rr.mean().item(), rel=1e-5)
    assert m["rewards/accuracies"].item() == (trl_cr > trl_rr).float().mean().item()
    assert m["rewards/margins"].item() == pytest.approx((trl_cr - trl_rr).mean().item(), rel=1e-5)
    assert m["log_odds_ratio"].item() == pytest.approx(trl_ratio.item(), rel=1e-5)
    assert m["log_odds_chosen"].item() == pytest.approx(trl_log_odds.item(), rel=1e-5, abs=1e-6)


def _extreme_values(gen: torch.Generator, n: int) -> torch.Tensor:
    ln2 = math.log(2.0)
    specials = torch.tensor(
        [0.0, -0.0, -1e4, -ln2, -ln2 + 1e-7, -ln2 - 1e-7, -1e-30, -1e-45, -1e-6, -1e-7, -1e-5, -9999.999, -1.0]
    )
    # log-uniform magnitudes from 1e-30 to 1e4 cover every regime of log1mexp
    magnitudes = 10 ** (torch.rand(n, generator=gen) * 34 - 30)
    return torch.cat([specials, -magnitudes.clamp(max=1e4)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.1, 10.0])
def test_fuzz_extreme_inputs_stay_finite(seed, beta):
    gen = torch.Generator().manual_seed(seed)
    values = _extreme_values(gen, 200)
    chosen = values[torch.randperm(len(values), generator=gen)]
    rejected = values[torch.randperm(len(values), generator=gen)]
    rejected[:20] = chosen[:20]  # equal pairs: log odds ratio exactly 0
    out = _outputs(chosen, rejected, nll=3.0, requires_grad=True)
    loss, metrics = orpo_loss(out, beta)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    for grad in (out.chosen_logps.grad, out.rejected_logps.grad, out.nll.grad):
        assert torch.isfinite(grad).all()
    per_example = odds_ratio_loss(chosen, rejected)
    assert torch.isfinite(per_example).all() and (per_example >= 0).all()
    # equal pairs: L_OR = -log sigmoid(0) = ln 2
    torch.testing.assert_close(per_example[:20], torch.full((20,), math.log(2.0)))


def test_step_nll_weights_hand_worked():
    # Two micro-batches with 2 and 6 NLL tokens and token-mean NLLs 1.0 and 3.0: the step's token mean is
    # (2 * 1.0 + 6 * 3.0) / 8 = 2.5, while the plain mean of the two means would be 2.0.
    weights = step_nll_weights([2.0, 6.0], 8.0, 2)
    assert weights == [0.5, 1.5]
    nlls = [1.0, 3.0]
    losses = [orpo_loss(_outputs([-1.0], [-2.0], nll=n), beta=0.0, nll_weight=w)[1]["nll_loss"] for n, w in zip(nlls, weights)]
    assert float(sum(losses)) / 2 == pytest.approx(2.5)
    # Across ranks the step's token count is the all-reduced one: this rank's 2 + 6 of 16, four micro-batches.
    assert step_nll_weights([2.0, 6.0], 16.0, 4) == [0.5, 1.5]
    assert step_nll_weights([0.0], 0.0, 1) == [1.0]  # an empty step cannot divide by zero
