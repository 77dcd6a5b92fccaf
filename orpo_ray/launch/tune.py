"""`orpo-ray tune CONFIG [key=value ...]`: a Ray Tune sweep of the objective's beta (ORPO's λ) x learning rate
(x simpo.gamma for SimPO with tune.gamma), each trial a Ray Train run.

Flow of `run_sweep(cfg)` (the Tune-driver-function pattern Ray Train V2 documents):

1. `ensure_ray`, then `tokenized_datasets(cfg)` ONCE: the materialised Ray datasets reach every trial through
   `tune.with_parameters`, so no trial tokenizes again (the Parquet cache under output_dir/cache also makes a
   re-run of the sweep skip tokenization).
2. An MLflow parent run for the sweep (its id is kept in `sweep_state.json`, so a resumed sweep logs to the
   same parent). Each trial's rank 0 logs a child run (`extras["mlflow_parent_run_id"]`).
3. `Tuner(trial_driver)`: a trial is a small driver function that builds its config (`sweep.trial_config`)
   and fits a TorchTrainer (`launch/trainer.fit_run`), so a trial can itself use several DeepSpeed workers. The
   driver holds no CPU (it only waits on Ray Train); `tune.max_concurrent_trials` bounds how many Train runs
   compete for the workers' CPUs. `EvalReportCallback` forwards one result per evaluation to Tune, so ASHA
   compares trials evaluation by evaluation (time_attr = training_iteration = evaluations so far).
4. Re-running the command resumes: `Tuner.restore` picks up unfinished trials and each trial's Ray Train run
   resumes from its latest checkpoint. A finished sweep is returned as it is; a changed config is refused.
5. Results: `tune_results.json` (every trial's config, status, final metrics, checkpoint and model paths, and
   the best trial), `trials.md` (the printed table), `heatmap_<metric>.png` (λ x learning rate),
   `lambda_effect.png` (held-out margin and accuracy against λ), the best trial's model copied to
   `best_model/`; all logged on the parent run, the best child run tagged `orpo.best_trial=true`, and its
   logged model registered as `tracking.registered_model_name` (λ, lr and held-out metrics as version tags).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orpo_ray.config import Config, config_from_dict, with_absolute_paths
from orpo_ray.launch.run_state import output_dir_lock, read_state, save_state
from orpo_ray.launch.session import ensure_ray
from orpo_ray.launch.sweep import (
    TABLE_METRICS,
    beta_label,
    best_trial,
    check_metric,
    evaluations_per_trial,
    format_table,
    lambda_rows,
    trial_config,
    trial_dir_name,
    trial_row,
)
from orpo_ray.launch.trainer import fit_run
from orpo_ray.results import no_eval_reason

SWEEP_STATE_FILE = "sweep_state.json"  # {"config": identity, "mlflow_parent_run_id": ..., "completed": bool}
RESULTS_FILE = "tune_results.json"
# A trial driver only waits on its Ray Train run, so it holds no CPU (a CPU each would leave a 2-core machine
# none for the training workers); Tune needs a non-empty request, hence a token amount of memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 1024**2}


class EvalReportCallback(TuneReportCallback):
    """Forward to Tune only the reports that carry a fresh evaluation (the training loop puts eval_ metrics
    only in the report of the step that computed them), so each Tune result is one evaluation."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_driver(params: dict, *, base_config: dict, datasets: dict, extras: dict) -> None:
    """One Tune trial: this beta, learning rate (and gamma), trained by a full Ray Train run."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config_from_dict(base_config), trial_id, params["beta"], params["learning_rate"],
                       params.get("gamma"))
    print(f"[orpo-ray tune] trial {trial_id}: {cfg.tracking.run_name} -> {cfg.output_dir}", flush=True)
    fit_run(cfg, datasets, extras, callbacks=[EvalReportCallback(cfg.tune.metric)])


def search_space(cfg: Config) -> dict:
    u = cfg.tune
    lr = (tune.grid_search([float(x) for x in u.learning_rate]) if u.learning_rate
          else tune.loguniform(u.learning_rate_min, u.learning_rate_max))
    space = {"beta": tune.grid_search([float(b) for b in u.beta]), "learning_rate": lr}
    if u.gamma:  # config validation allows it only for SimPO
        space["gamma"] = tune.grid_search([float(g) for g in u.gamma])
    return space


def run_sweep(cfg: Config) -> dict:
    """`orpo-ray tune`: one writer per output_dir, as for `train` - the same lock, so a sweep and a training run
    (or two sweeps) never share a directory."""
    cfg = with_absolute_paths(cfg)
    check_metric(cfg)
    with output_dir_lock(cfg.output_dir):
        return _sweep(cfg)


def _sweep(cfg: Config) -> dict:
    from orpo_ray.data.ray_pipeline import tokenized_datasets
    from orpo_ray.tracking import make_tracker
    from orpo_ray.tracking.datasets import dataset_inputs

    out = Path(cfg.output_dir)
    state = read_state(out / SWEEP_STATE_FILE, cfg, "sweep") or {}
    if state.get("completed") and (out / RESULTS_FILE).exists():
        print(f"[orpo-ray tune] {out} already holds this finished sweep; nothing to do "
              "(use a new output_dir to sweep again)", flush=True)
        return json.loads((out / RESULTS_FILE).read_text())

    started = time.perf_counter()
    ensure_ray(cfg, dashboard=True)  # the placement-group cleaner frees stopped trials through the State API
    datasets, data_stats = tokenized_datasets(cfg)
    if not data_stats["eval_pairs"]:  # before any trial runs: a sweep without eval metrics cannot rank trials
        raise ValueError(f"tune ranks trials by {cfg.tune.metric}, an eval metric, but there are {no_eval_reason(cfg)}")
    parent = make_tracker(cfg)
    uri = parent.tracking_uri
    with parent:
        experiment = cfg.tracking.experiment
        if not (state.get("mlflow_parent_run_id") and parent.attach(experiment, state["mlflow_parent_run_id"])):
            parent.start(experiment, run_name=cfg.tracking.run_name or f"sweep {out.name}",
                         tags={"kind": "sweep", "output_dir": str(out)})
            parent.log_params({**cfg.to_dict(), "data": data_stats})
            for dataset in dataset_inputs(cfg, data_stats):
                parent.log_dataset(dataset)
        save_state(out / SWEEP_STATE_FILE, cfg, mlflow_parent_run_id=parent.run_id, completed=False)

        tuner = _tuner(cfg, datasets, {"data_stats": data_stats, "mlflow_uri": uri,
                                       "mlflow_parent_run_id": parent.run_id}, data_stats["train_pairs"])
        grid = tuner.fit()

        rows = []
        for result in grid:
            trial_id = Path(result.path).name  # trial_dirname_creator names trial dirs by id
            beta, lr, gamma = result.config["beta"], result.config["learning_rate"], result.config.get("gamma")
            rows.append(trial_row(trial_id, beta, lr, out / "trials" / trial_dir_name(trial_id, beta, lr, gamma),
                                  result.metrics or {}, None if result.error is None else str(result.error), gamma))
        # Child runs of trials ASHA stopped (or that failed) were cut off before they could end themselves.
        parent.end_open_children("KILLED")
        summary = _summarize(cfg, rows, data_stats, time.perf_counter() - started, parent.run_id)
        _log_summary(parent, cfg, summary)
        if link := parent.ui_link():
            print(f"[orpo-ray tune] review in MLflow (trials nest under the sweep's run): {link}", flush=True)
    # A sweep with failed trials is not finished: re-running it resumes them (Tuner.restore, resume_errored).
    save_state(out / SWEEP_STATE_FILE, cfg, mlflow_parent_run_id=summary["mlflow_parent_run_id"],
               completed=not any(r["status"] == "error" for r in rows))
    return summary


def _tuner(cfg: Config, datasets: dict, extras: dict, train_pairs: int) -> tune.Tuner:
    u = cfg.tune
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base_config=cfg.to_dict(), datasets=datasets, extras=extras),
        TRIAL_DRIVER_RESOURCES)
    path = Path(cfg.output_dir) / "ray" / "tune"
    if tune.Tuner.can_restore(str(path)):
        print(f"[orpo-ray tune] resuming the sweep in {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if u.asha:
        from ray.tune.schedulers import ASHAScheduler

        # stop_last_trials=False: a trial's last evaluation comes before its model export, and a STOP there
        # would kill a trial that has finished training in the middle of exporting.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evaluations_per_trial(cfg, train_pairs),
                                  grace_period=u.asha_grace_period, reduction_factor=u.asha_reduction_factor,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=u.metric, mode=u.mode, num_samples=u.num_samples,
                                    max_concurrent_trials=u.max_concurrent_trials, scheduler=scheduler,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name="tune", storage_path=str(path.parent), verbose=1),
    )


def _summarize(cfg: Config, rows: list[dict], data_stats: dict, wall_seconds: float,
               parent_run_id: str | None) -> dict:
    """tune_results.json, trials.md, plots and best_model/ in output_dir; printed table."""
    from orpo_ray.tracking.plots import plot_heatmap, plot_lambda_sweep

    out, u = Path(cfg.output_dir), cfg.tune
    best = best_trial(rows, u.metric, u.mode)
    if best and best["model_dir"]:
        shutil.copytree(best["model_dir"], out / "best_model", dirs_exist_ok=True)
    label = beta_label(cfg.objective)
    table = format_table(rows, u.metric, best["trial_id"] if best else None, label)
    (out / "trials.md").write_text(table)
    # With a γ sweep each (β, γ) is its own heatmap row, so cells never average over γ.
    flat = [{"beta": f"{r['beta']:g}, γ={r['gamma']:g}" if "gamma" in r else r["beta"],
             "learning_rate": r["learning_rate"], **r["metrics"]} for r in rows]
    y_label = f"{label} ({cfg.objective}.beta)" + (", γ (simpo.gamma)" if u.gamma else "")
    figures = [plot_heatmap(flat, "learning_rate", "beta", u.metric, out / f"heatmap_{u.metric.replace('/', '_')}.png",
                            x_label="learning rate", y_label=y_label,
                            title=f"{u.metric} (last evaluation of each trial)")]
    per_lambda = lambda_rows(rows, u.metric, u.mode)
    if len(per_lambda) > 1:
        figures.append(plot_lambda_sweep(per_lambda, out / "lambda_effect.png",
                                         f"Effect of {label}: best completed trial per {label}"))
    summary = {
        "metric": u.metric, "mode": u.mode, "wall_seconds": wall_seconds,
        "best": best, "trials": rows, "lambda_effect": per_lambda,
        "best_model_dir": str(out / "best_model") if best and best["model_dir"] else None,
        "figures": [str(f) for f in figures], "data": data_stats,
        "mlflow_parent_run_id": parent_run_id,
    }
    (out / RESULTS_FILE).write_text(json.dumps(summary, indent=1, default=str, ensure_ascii=False))
    print(table, flush=True)
    if best:
        print(f"[orpo-ray tune] best trial {best['trial_id']}: {label}={best['beta']:g} lr={best['learning_rate']:.3g} "
              f"{u.metric}={best['metrics'][u.metric]:.4f} | {len(rows)} trials in {wall_seconds:.0f} s", flush=True)
    else:
        print("[orpo-ray tune] no trial completed; see tune_results.json for errors", flush=True)
    return summary


def _log_summary(parent, cfg: Config, summary: dict) -> None:
    out, best = Path(cfg.output_dir), summary["best"]
    for path in (out / RESULTS_FILE, out / "trials.md", *map(Path, summary["figures"]), out / "quarantine.jsonl"):
        if path.exists():
            parent.log_artifact(path)
    parent.log_metrics({"trials": len(summary["trials"]), "wall_seconds": summary["wall_seconds"]}, step=0)
    if best:
        parent.log_metrics({f"best/{k}": v for k, v in best["metrics"].items()}, step=0)
        parent.set_tags({"best_trial": best["trial_id"], "best_beta": best["beta"],
                         "best_learning_rate": best["learning_rate"], "best_run_id": best["mlflow_run_id"] or ""})
        if best["mlflow_run_id"]:
            parent.set_tags({"orpo.best_trial": "true"}, run_id=best["mlflow_run_id"])
            _register_best(parent, cfg, best)


def _register_best(parent, cfg: Config, best: dict) -> None:
    """The best trial's logged model into the Model Registry, with what chose it as version tags."""
    name = cfg.tracking.registered_model_name
    if not (name and cfg.tracking.log_model and cfg.export.save_model):
        return
    held_out = {k: best["metrics"][k] for k in dict.fromkeys((cfg.tune.metric, *TABLE_METRICS)) if k in best["metrics"]}
    tags = {"orpo.beta": best["beta"], "train.learning_rate": best["learning_rate"], "trial_id": best["trial_id"],
            "sweep_run_id": parent.run_id or "", **held_out}
    version = parent.register_model(name, best["mlflow_run_id"], tags)
    if version:
        parent.set_tags({"registered_model": f"{name}/{version}"})
        print(f"[orpo-ray tune] best model registered as {name!r} version {version}", flush=True)
