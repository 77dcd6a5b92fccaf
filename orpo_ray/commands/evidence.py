"""Alignment evidence: SFT vs ORPO through the same loop, data and seed (the paper's Figure 3).

    orpo-ray evidence configs/evidence/synthetic.yaml [key=value ...]     # SFT vs ORPO
    orpo-ray tune configs/evidence/lambda_sweep.yaml                      # the effect of λ

SFT is ORPO with `orpo.beta=0` (loss == NLL of the chosen response, the paper's L_SFT), so the two arms differ
in nothing but λ. Each arm is a normal in-process `train_loop_per_worker` run under `output_dir/<arm>` followed
by `commands.eval.run_eval` on its exported model (eval.json with generations). The driver writes to `output_dir`:

  logps_sft_vs_orpo.png  train (solid) and held-out (dashed) mean log-probs of chosen and rejected over steps,
                         one panel per arm, shared y axis: under SFT rejected rises with chosen, under ORPO not
  evidence.json / .md    per arm: held-out accuracy, log-prob margin, chosen/rejected log-probs, NLL

and logs them as artifacts of an MLflow parent run whose children are the arms' runs (when tracking is on).
The effect of λ is a Ray Tune sweep (`orpo-ray tune`), which draws its λ plot with `tracking.plots.plot_lambda_sweep`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from orpo_ray.commands.eval import run_eval
from orpo_ray.config import Config, loop_config
from orpo_ray.results import logp_margin
from orpo_ray.tracking.plots import plot_logps_by_arm

SUMMARY_COLUMNS = (  # (evidence.json key, table header)
    ("beta", "λ"),
    ("accuracy", "held-out accuracy"),
    ("logp_margin", "log-prob margin"),
    ("logps_chosen", "logps/chosen"),
    ("logps_rejected", "logps/rejected"),
    ("nll", "NLL"),
)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    beta: float


def arms_for(cfg: Config) -> list[Arm]:
    """SFT (λ=0) and ORPO (λ=orpo.beta)."""
    if cfg.orpo.beta <= 0:
        raise ValueError("evidence compares SFT (λ=0) with ORPO: orpo.beta must be > 0")
    return [Arm("sft", 0.0), Arm("orpo", float(cfg.orpo.beta))]


def arm_config(cfg: Config, arm: Arm) -> Config:
    """The base config with this arm's λ, its own output_dir, run name, and its model as eval checkpoint."""
    out = str(Path(cfg.output_dir) / arm.name)
    base_name = cfg.tracking.run_name or Path(cfg.output_dir).name
    return dataclasses.replace(
        cfg,
        output_dir=out,
        orpo=dataclasses.replace(cfg.orpo, beta=arm.beta),
        tracking=dataclasses.replace(cfg.tracking, run_name=f"{base_name}-{arm.name}"),
        export=dataclasses.replace(cfg.export, save_model=True),  # run_eval reads the exported model
        eval=dataclasses.replace(cfg.eval, checkpoint=out),
    )


def summarize(arm: Arm, eval_metrics: Mapping[str, float]) -> dict:
    """One table row from an arm's held-out metrics (eval_ names)."""
    return {
        "arm": arm.name,
        "beta": arm.beta,
        "accuracy": float(eval_metrics["eval_rewards/accuracies"]),
        "logp_margin": logp_margin(eval_metrics),
        "logps_chosen": float(eval_metrics["eval_logps/chosen"]),
        "logps_rejected": float(eval_metrics["eval_logps/rejected"]),
        "nll": float(eval_metrics["eval_nll_loss"]),
    }


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """rows from `summarize` as a Markdown table (the form the README quotes)."""
    head = "| arm | " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |"
    rule = "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)
    body = ["| " + str(r["arm"]) + " | " + " | ".join(_cell(k, r[k]) for k, _ in SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def _cell(key: str, value: Any) -> str:
    if key == "beta":
        return f"{value:g}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------- driver
def run_evidence(cfg: Config, command: str | None = None) -> dict:
    """Train and evaluate every arm, then write plots, evidence.json/.md and log them to MLflow."""
    from orpo_ray.tracking import make_tracker
    from orpo_ray.train.loop import train_loop_per_worker

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    parent = make_tracker(cfg)
    uri = parent.tracking_uri
    with parent:
        parent.start(cfg.tracking.experiment, run_name=cfg.tracking.run_name or root.name,
                     tags={"kind": "evidence", "command": command or ""})
        parent.log_params(cfg.to_dict())
        extras = {"mlflow_uri": uri, "mlflow_parent_run_id": parent.run_id}
        rows, histories = [], {}
        for arm in arms_for(cfg):
            arm_cfg = arm_config(cfg, arm)
            print(f"[orpo-ray evidence] arm {arm.name}: λ = {arm.beta:g} -> {arm_cfg.output_dir}", flush=True)
            train_loop_per_worker(loop_config(arm_cfg, extras))
            evaluation = run_eval(arm_cfg, mlflow_uri=uri, parent_run_id=parent.run_id)
            rows.append(summarize(arm, evaluation["eval"]) | {"generations": evaluation["generations"][:3]})
            histories[arm.name] = (arm.beta, json.loads((Path(arm_cfg.output_dir) / "history.json").read_text()))

        task = cfg.data.synthetic.task if cfg.data.train_path is None else Path(cfg.data.train_path).name
        figures = [plot_logps_by_arm(histories, root / "logps_sft_vs_orpo.png",
                                     f"SFT vs ORPO on {task}: same data, seed and steps")]
        evidence = {"command": command, "task": task, "arms": rows, "config": cfg.to_dict()}
        (root / "evidence.json").write_text(json.dumps(evidence, indent=1, ensure_ascii=False))
        (root / "evidence.md").write_text(f"`{command}`\n\n" + markdown_table(rows))
        for path in (*figures, root / "evidence.json", root / "evidence.md"):
            parent.log_artifact(path)
        parent.log_metrics({f"{r['arm']}/{k}": r[k] for r in rows for k, _ in SUMMARY_COLUMNS[1:]}, step=0)
    print(markdown_table(rows), flush=True)
    return evidence
