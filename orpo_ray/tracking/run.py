"""What one training run logs (rank 0 only): a thin policy layer over the never-fatal tracker."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orpo_ray.output_staging import OUTPUT_URI_ENV
from orpo_ray.tracking.datasets import dataset_inputs
from orpo_ray.tracking.factory import make_tracker
from orpo_ray.tracking.plots import plot_training_curves
from orpo_ray.tracking.protocol import ExperimentTracker


def describe_run(cfg: Any) -> str:
    """What the run is, for the runs table: tracking.run_name, else output_dir's name (by convention the
    config's), λ and learning rate."""
    return cfg.tracking.run_name or (f"{Path(cfg.output_dir).name} λ={cfg.orpo.beta:g} "
                                     f"lr={cfg.train.learning_rate:.3g}")


def plan_tags(plan: Mapping[str, Any], precision: str, objective: str,
              fast_path: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The resolved run as MLflow tags a person filters the runs table on (``tags.`orpo.zero_stage` = '2'``):
    the params hold the same facts, but as one long list per run; tags are what the UI's search and columns
    are for. `fast_path`: the switches as applied (`FastPath.record`: on / off / fallback: why), else the
    plan's requested ones."""
    stage = re.search(r"ZeRO-(\d)", str(plan["engine"]))
    applied = dict(fast_path) if fast_path else {k: "on" if v is True else "off" for k, v in plan["fast_path"].items()}
    on = [k for k, v in applied.items() if v == "on"]  # the switches, in forward/fast_path.SWITCHES' order
    fallbacks = [k for k, v in applied.items() if str(v).startswith("fallback")]
    return {
        "orpo.objective": objective,
        "orpo.workers": str(plan["workers"]),
        "orpo.device": str(plan["device"]),
        "orpo.backend": str(plan["backend"]),
        "orpo.engine": "deepspeed" if stage else "torch",
        "orpo.zero_stage": stage.group(1) if stage else "none",
        "orpo.precision": precision,
        "orpo.attention": str(plan["attention"]),
        "orpo.fast_path": "+".join(on) or "plain",
        "orpo.lm_head": str(plan["fast_path"].get("lm_head", "chunked")) if "chunked_lm_head" in on else "full",
        "orpo.fast_path_fallbacks": "+".join(fallbacks) or "none",
    }


def run_tags(cfg: Any) -> dict:
    """Tags every run carries. output_dir is where the outputs end up: the URI for a URI output_dir (the local
    staging dir the run wrote to is kept beside it), else the absolute directory."""
    local = str(Path(cfg.output_dir).resolve())
    uri = os.environ.get(OUTPUT_URI_ENV)
    return {"orpo.beta": cfg.orpo.beta, "output_dir": uri or local, **({"output_staging_dir": local} if uri else {})}


class RunTracker:
    """What one training run logs, on rank 0 only: params, data inputs, TRL-named metrics, system metrics,
    and artifacts and the model at the end.

    A thin policy layer over an `ExperimentTracker` (which owns the never-fatal calls): under a Tune sweep
    the run becomes a child of the sweep's parent run (`extras["mlflow_parent_run_id"]`).
    """

    def __init__(self, tracker: ExperimentTracker):
        self.tracker = tracker

    @classmethod
    def for_worker(cls, cfg: Any, extras: Mapping[str, Any], is_main: bool) -> "RunTracker":
        tracker = make_tracker(cfg, main=is_main, uri=extras.get("mlflow_uri"))
        if tracker.enabled:
            tracker.start(cfg.tracking.experiment, run_name=describe_run(cfg),
                          tags=run_tags(cfg),
                          parent_run_id=extras.get("mlflow_parent_run_id"))
            if cfg.tracking.system_metrics:  # rank 0 only: one node's view, not one series per worker
                tracker.start_system_metrics(cfg.tracking.system_metrics_interval_s)
        return cls(tracker)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def log_start(self, cfg: Any, data_stats: Mapping[str, Any], precision: str,
                  plan: Mapping[str, Any] | None = None, fast_path: Mapping[str, Any] | None = None) -> None:
        """Config as flattened params (`orpo.beta`, `train.learning_rate`: the same keys in every run, so
        MLflow's compare view lines runs up), the resolved plan (`plan.*`; and as `orpo.*` tags to filter on, see
        `plan_tags`), the fast-path switches as applied (`fast_path.*`), and the train/eval data as dataset inputs."""
        if not self.tracker.enabled:
            return
        self.tracker.log_params({**cfg.to_dict(), "data": data_stats, "precision": precision,
                                 **({"plan": plan} if plan else {}), **({"fast_path": fast_path} if fast_path else {})})
        if plan:
            self.tracker.set_tags(plan_tags(plan, precision, cfg.objective, fast_path))
        for dataset in dataset_inputs(cfg, data_stats):
            self.tracker.log_dataset(dataset)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def finish(self, cfg: Any, history: Sequence[Mapping[str, Any]], out_dir: Path, model: Any = None,
               tokenizer: Any = None) -> None:
        """Plots, config, results and quarantine report as artifacts, the exported model; then end the run."""
        if not self.tracker.enabled:
            return
        out_dir = Path(out_dir)
        for png in plot_training_curves(history, out_dir / "plots"):
            self.tracker.log_artifact(png, "plots")
        config_yaml = out_dir / "config.yaml"
        config_yaml.write_text(_yaml_dump(cfg.to_dict()))
        for name in ("config.yaml", "results.json", "history.json", "quarantine.jsonl"):
            if (out_dir / name).exists():
                self.tracker.log_artifact(out_dir / name)
        self.log_models(cfg, out_dir, model, tokenizer)
        link = self.tracker.ui_link()
        self.tracker.end("FINISHED")
        if link:
            print(f"[orpo-ray] review in MLflow: {link}", flush=True)

    def log_models(self, cfg: Any, out_dir: Path, model: Any, tokenizer: Any) -> None:
        """The exported model as a model of the run: LoRA as its adapter directory (merged: a plain model),
        otherwise in the transformers flavour; as plain artifacts when tracking.log_model is off."""
        lora = cfg.model.lora.enabled
        for name in ("model", "merged"):  # merged: LoRA adapters folded into a plain model (export.merge_lora)
            if not (out_dir / name).is_dir():
                continue
            if not cfg.tracking.log_model:
                self.tracker.log_artifacts(out_dir / name, name)
            elif name == "model":
                self.tracker.log_model(out_dir / name, name=name, model=None if lora else model,
                                       tokenizer=tokenizer, adapter=lora)
            else:
                self.tracker.log_model(out_dir / name, name=name)


def _yaml_dump(values: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(values), sort_keys=False)
