"""Pure helpers of `orpo-ray eval` and the evidence driver, and the evidence task's data (no training)."""

import math

import pytest
import torch

from orpo_ray.config import load_config
from orpo_ray.commands.eval import logp_margin, resolve_checkpoint
from orpo_ray.commands.evidence import Arm, arm_config, arms_for, markdown_table, summarize
from orpo_ray.forward.logprobs import PolicyOutputs
from orpo_ray.objectives.orpo import orpo_loss
from orpo_ray.results import with_prefix
from orpo_ray.data.synthetic import generate_pairs


def _outputs(chosen, rejected):
    zero = torch.tensor(0.0)
    return PolicyOutputs(chosen_logps=torch.tensor(chosen), rejected_logps=torch.tensor(rejected),
                         nll=torch.tensor(0.7), chosen_logits_mean=zero, rejected_logits_mean=zero)


def test_resolve_checkpoint_accepts_a_model_dir_or_a_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    assert resolve_checkpoint(run) == (run / "model").resolve()
    assert resolve_checkpoint(run / "model") == (run / "model").resolve()
    with pytest.raises(FileNotFoundError, match="eval.checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


def test_logp_margin_is_not_scaled_by_beta():
    """At beta = 0 TRL's rewards/margins is 0 whatever the model; the log-prob margin still measures it."""
    # Hand values: chosen - rejected = (-1 + 2) and (-0.5 + 3) -> mean (1 + 2.5) / 2 = 1.75
    _, metrics = orpo_loss(_outputs([-1.0, -0.5], [-2.0, -3.0]), beta=0.0)
    metrics = with_prefix({k: float(v) for k, v in metrics.items()}, "eval_")
    assert metrics["eval_rewards/margins"] == 0.0
    assert logp_margin(metrics) == pytest.approx(1.75)


def test_arms_compare_sft_with_orpo_at_the_configured_lambda():
    cfg = load_config(None, ["orpo.beta=0.7", "output_dir=/x/ev"])
    assert arms_for(cfg) == [Arm("sft", 0.0), Arm("orpo", 0.7)]
    with pytest.raises(ValueError, match="orpo.beta must be > 0"):
        arms_for(load_config(None, ["orpo.beta=0"]))


def test_arm_config_differs_from_the_base_only_in_lambda_and_where_it_writes():
    base = load_config(None, ["orpo.beta=0.7", "output_dir=/x/ev", "export.save_model=false"])
    sft = arm_config(base, Arm("sft", 0.0))
    assert (sft.orpo.beta, sft.output_dir, sft.eval.checkpoint) == (0.0, "/x/ev/sft", "/x/ev/sft")
    assert sft.tracking.run_name == "ev-sft" and sft.export.save_model  # eval reads the exported model
    assert (sft.train, sft.data, sft.model) == (base.train, base.data, base.model)


def test_summary_row_and_table():
    metrics = {"eval_rewards/accuracies": 0.75, "eval_logps/chosen": -1.0, "eval_logps/rejected": -1.5,
               "eval_nll_loss": 1.0}
    row = summarize(Arm("orpo", 0.5), metrics)
    assert row == {"arm": "orpo", "beta": 0.5, "accuracy": 0.75, "logp_margin": 0.5, "logps_chosen": -1.0,
                   "logps_rejected": -1.5, "nll": 1.0}
    lines = markdown_table([row]).splitlines()
    assert lines[0].startswith("| arm | λ | held-out accuracy | log-prob margin")
    assert lines[2] == "| orpo | 0.5 | 0.750 | 0.500 | -1.000 | -1.500 | 1.000 |"


def test_pick_task_prefers_earlier_letters_and_hides_it_from_chosen_alone():
    pairs = generate_pairs("pick", 400, seed=3)
    assert pairs == generate_pairs("pick", 400, seed=3)
    ranks_chosen, ranks_rejected = [], []
    for p in pairs:
        letters = sorted(p["prompt"].split(": ", 1)[1].split("\n")[0].split())
        chosen, rejected = p["chosen"].strip(), p["rejected"].strip()
        assert chosen in letters and rejected in letters and chosen < rejected
        assert chosen != letters[-1]
        ranks_chosen.append(letters.index(chosen) / (len(letters) - 2))
        ranks_rejected.append(letters.index(rejected) / (len(letters) - 1))
    # chosen is uniform over all ranks but the last (mean relative rank ~0.5); rejected sits later on average
    assert math.isclose(sum(ranks_chosen) / len(pairs), 0.5, abs_tol=0.06)
    assert sum(ranks_rejected) / len(pairs) > 0.7
