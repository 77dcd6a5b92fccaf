"""Alignment evidence: SFT vs ORPO through the same loop, data and seed (the paper's Figure 3).

    python -m orpo_ray.evidence configs/evidence/synthetic.yaml [key=value ...]               # SFT vs ORPO
    orpo-ray tune configs/evidence/lambda_sweep.yaml                                          # λ's effect

SFT is ORPO with `orpo.beta=0` (loss == NLL of the chosen response, the paper's L_SFT), so the two arms differ
in nothing but λ. Each arm is a normal in-process `train_loop_per_worker` run under `output_dir/<arm>` followed
by `evaluate.run_eval` on its exported model (eval.json with generations). The driver writes to `output_dir`:

  logps_sft_vs_orpo.png  train (solid) and held-out (dashed) mean log-probs of chosen and rejected over steps,
                         one panel per arm, shared y axis: under SFT rejected rises with chosen, under ORPO not
  evidence.json / .md    per arm: held-out accuracy, log-prob margin, chosen/rejected log-probs, NLL

and logs them as artifacts of an MLflow parent run whose children are the arms' runs (when tracking is on).
The effect of λ is a Ray Tune sweep (`orpo-ray tune`), which draws its λ plot with `plot_lambda_sweep` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from orpo_ray.config import Config, ConfigError, load_config, with_absolute_paths
from orpo_ray.evaluate import logp_margin, run_eval

CHOSEN, REJECTED = "tab:green", "tab:red"
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


# ----------------------------------------------------------------------------------------------- plots
def plot_logps_by_arm(histories: Mapping[str, tuple[float, Sequence[Mapping]]], out_path: str | Path,
                      title: str = "") -> Path:
    """Figure 3 style: per arm, chosen vs rejected mean log-probs over steps (train solid, held-out dashed)."""
    from orpo_ray.tracking import _new_figure, _series

    fig = _new_figure((5.0 * len(histories), 4.2))
    axes = fig.subplots(1, len(histories), sharey=True, squeeze=False)[0]
    for ax, (name, (beta, history)) in zip(axes, histories.items()):
        for key, label, color, style in (("logps/chosen", "chosen (train)", CHOSEN, "-"),
                                         ("logps/rejected", "rejected (train)", REJECTED, "-"),
                                         ("eval_logps/chosen", "chosen (held-out)", CHOSEN, "--"),
                                         ("eval_logps/rejected", "rejected (held-out)", REJECTED, "--")):
            steps, values = _series(history, key)
            ax.plot(steps, values, style, color=color, label=label, linewidth=1.6 if style == "-" else 1.4,
                    marker="o" if style == "--" else None, markersize=3.5, alpha=0.55 if style == "-" else 1.0)
        final = [r for r in history if "eval_rewards/accuracies" in r][-1:]
        note = (f"\nheld-out accuracy {final[0]['eval_rewards/accuracies']:.2f}, "
                f"margin {logp_margin(final[0]):.2f}") if final else ""
        ax.set_title(f"{'SFT' if beta == 0 else 'ORPO'} (λ = {beta:g}){note}", fontsize=10)
        ax.set_xlabel("Optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Mean log-prob per response token")
    axes[-1].legend(loc="lower right", fontsize="small")
    return _save(fig, out_path, title)


def plot_lambda_sweep(rows: Sequence[Mapping[str, Any]], out_path: str | Path, title: str = "") -> Path:
    """Held-out log-prob margin and accuracy against λ (λ as evenly spaced categories: the grid includes 0)."""
    from orpo_ray.tracking import _new_figure

    rows = sorted(rows, key=lambda r: r["beta"])
    xs = range(len(rows))
    fig = _new_figure((9.0, 3.8))
    left, right = fig.subplots(1, 2)
    for ax, key, label, color in ((left, "logp_margin", "log-prob margin (chosen - rejected)", "tab:blue"),
                                  (right, "accuracy", "preference accuracy", "tab:orange")):
        values = [r[key] for r in rows]
        ax.plot(xs, values, "o-", color=color)
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xticks(list(xs), [f"{r['beta']:g}" for r in rows])
        ax.set_xlabel("λ (orpo.beta); λ = 0 is SFT")
        ax.set_ylabel(f"held-out {label}")
        ax.grid(True, alpha=0.3)
    right.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    lo = min(r["accuracy"] for r in rows)
    right.set_ylim(min(0.45, lo - 0.05), 1.02)
    return _save(fig, out_path, title)


def _save(fig, out_path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=11)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------------- driver
def run_evidence(cfg: Config, command: str | None = None) -> dict:
    """Train and evaluate every arm, then write plots, evidence.json/.md and log them to MLflow."""
    from orpo_ray.tracking import Tracker, resolve_tracking_uri
    from orpo_ray.train_loop import RUN_EXTRAS_KEY, train_loop_per_worker

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir) if cfg.tracking.enabled else None
    parent = Tracker(uri)
    with parent:
        parent.start(cfg.tracking.experiment, run_name=cfg.tracking.run_name or root.name,
                     tags={"kind": "evidence", "command": command or ""})
        parent.log_params({"config": cfg.to_dict()})
        extras = {"mlflow_uri": uri, "mlflow_parent_run_id": parent.run_id}
        rows, histories = [], {}
        for arm in arms_for(cfg):
            arm_cfg = arm_config(cfg, arm)
            print(f"[orpo-ray evidence] arm {arm.name}: λ = {arm.beta:g} -> {arm_cfg.output_dir}", flush=True)
            train_loop_per_worker({**arm_cfg.to_dict(), RUN_EXTRAS_KEY: extras})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orpo_ray.evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"orpo-ray: config error: {e}", file=sys.stderr)
        return 2
    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run_evidence(cfg, command=f"python -m orpo_ray.evidence {argv_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
