"""What a sweep is made of, without Ray: trial configs, the trial table, the best trial.

A trial sets the objective's beta (ORPO's λ, SimPO's or CPO's β: ``<objective>.beta``), the learning rate and,
for SimPO with ``tune.gamma``, ``simpo.gamma``.

`tune.py` runs the sweep with Ray Tune; everything here is plain data so it tests in milliseconds.
A trial is identified by Tune's trial id; its training run lives in `output_dir/trials/<trial dir>` (own
results.json, history.json, exported model, Ray Train checkpoints), and its MLflow run is a child of the
sweep's parent run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from orpo_ray.config import Config, ConfigError
from orpo_ray.objectives import get_objective
from orpo_ray.results import logp_margin

TABLE_METRICS = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss", "eval_nll_loss")


def check_metric(cfg: Config) -> None:
    """tune.metric must be a held-out metric the training loop reports."""
    allowed = [f"eval_{name}" for name in get_objective(cfg.objective).metric_names]
    if cfg.tune.metric not in allowed:
        raise ConfigError(f"tune.metric={cfg.tune.metric!r} is not a reported held-out metric; one of {allowed}")


def evaluations_per_trial(cfg: Config, train_pairs: int) -> int:
    """How many evaluations a full trial reports (ASHA's max_t): every train.eval_interval steps and at the
    last step (the training loop's rule)."""
    t = cfg.train
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * cfg.scaling.num_workers
    steps = t.total_steps(train_pairs // global_batch)
    return steps // t.eval_interval + (steps % t.eval_interval > 0) if t.eval_interval else 1


def beta_label(objective: str) -> str:
    """How the swept beta is called: ORPO's paper calls it λ, SimPO's and CPO's β."""
    return "λ" if objective == "orpo" else "β"


def trial_dir_name(trial_id: str, beta: float, learning_rate: float, gamma: float | None = None) -> str:
    return f"{trial_id}_beta{beta:g}" + (f"_gamma{gamma:g}" if gamma is not None else "") + f"_lr{learning_rate:.3g}"


def trial_config(base: Config, trial_id: str, beta: float, learning_rate: float, gamma: float | None = None) -> Config:
    """The sweep's config with this trial's beta (of ``base.objective``), learning rate and SimPO gamma (when
    swept), its own output_dir and MLflow run name."""
    sweep_name = base.tracking.run_name or Path(base.output_dir).name
    section = dataclasses.replace(getattr(base, base.objective), beta=float(beta))  # sections are named like objectives
    if gamma is not None:
        section = dataclasses.replace(section, gamma=float(gamma))
    name = f"{sweep_name} {beta_label(base.objective)}={beta:g}" + (f" γ={gamma:g}" if gamma is not None else "")
    return dataclasses.replace(
        base,
        output_dir=str(Path(base.output_dir) / "trials" / trial_dir_name(trial_id, beta, learning_rate, gamma)),
        train=dataclasses.replace(base.train, learning_rate=float(learning_rate)),
        tracking=dataclasses.replace(base.tracking, run_name=f"{name} lr={learning_rate:.3g}"),
        **{base.objective: section},
    ).validate(where=f"trial {trial_id}")


def trial_row(trial_id: str, beta: float, learning_rate: float, output_dir: str | Path,
              last_metrics: Mapping[str, Any], error: str | None, gamma: float | None = None) -> dict:
    """One row of tune_results.json: the trial's config, status, final metrics, checkpoint and model paths.

    status: `completed` (trained all steps: results.json exists), `error`, or `stopped early` (ASHA stopped
    it; its metrics are the last evaluation it reported).
    """
    results_file = Path(output_dir) / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    status = "error" if error else ("completed" if results else "stopped early")
    metrics = dict(results.get("eval", {})) if results else {k: v for k, v in last_metrics.items() if k.startswith("eval_")}
    row = {
        "trial_id": trial_id,
        "beta": float(beta),
        "learning_rate": float(learning_rate),
        **({"gamma": float(gamma)} if gamma is not None else {}),
        "status": status,
        "step": int(results["num_steps"]) if results else last_metrics.get("step"),
        "metrics": metrics,
        "output_dir": str(output_dir),
        "checkpoint_path": last_metrics.get("checkpoint_path"),
        "model_dir": results.get("model_dir") if results else None,
        "mlflow_run_id": results.get("mlflow_run_id") if results else None,
        "pairs_per_second": results.get("pairs_per_second") if results else None,
    }
    if error:
        row["error"] = error
    return row


def best_trial(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> dict | None:
    """The best completed trial by `metric` (ties: the earlier trial). Early-stopped trials have no final
    model, so they are not candidates."""
    candidates = [r for r in rows if r["status"] == "completed" and _finite(r["metrics"].get(metric))]
    if not candidates:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return dict(max(candidates, key=lambda r: sign * float(r["metrics"][metric])))


def lambda_rows(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> list[dict]:
    """Per λ, the held-out accuracy and log-prob margin of its best completed trial (for the λ-effect plot)."""
    out = []
    for beta in sorted({r["beta"] for r in rows}):
        best = best_trial([r for r in rows if r["beta"] == beta], metric, mode)
        if best:
            out.append({"beta": beta, "learning_rate": best["learning_rate"],
                        **({"gamma": best["gamma"]} if "gamma" in best else {}),
                        "accuracy": float(best["metrics"]["eval_rewards/accuracies"]),
                        "logp_margin": logp_margin(best["metrics"])})
    return out


def format_table(rows: Sequence[Mapping[str, Any]], metric: str, best_id: str | None, beta_name: str = "λ") -> str:
    """The trial table printed at the end of a sweep (and logged as `trials.md`); a γ column when swept."""
    gammas = any("gamma" in r for r in rows)
    params = [beta_name, *(["γ"] if gammas else []), "learning rate"]
    columns = ["trial", *params, "status", "step", *dict.fromkeys((metric, *TABLE_METRICS))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(rows, key=lambda r: (r["beta"], r.get("gamma", 0.0), r["learning_rate"])):
        cells = [r["trial_id"] + (" (best)" if r["trial_id"] == best_id else ""), f"{r['beta']:g}",
                 *([_fmt(r.get("gamma"), "g")] if gammas else []),
                 f"{r['learning_rate']:.3g}", r["status"], str(r["step"] if r["step"] is not None else "-")]
        cells += [_fmt(r["metrics"].get(k)) for k in columns[len(params) + 3:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(float(value), spec) if _finite(value) else "-"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
