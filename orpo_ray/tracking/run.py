"""What one training run logs (rank 0 only): a thin policy layer over the never-fatal MLflow tracker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orpo_ray.tracking.mlflow_tracker import Tracker, resolve_tracking_uri
from orpo_ray.tracking.plots import plot_training_curves


class RunTracker:
    """What one training run logs, on rank 0 only: params, TRL-named metrics, and artifacts at the end.

    A thin policy layer over `Tracker` (which owns the never-fatal MLflow calls): under a Tune sweep the
    run becomes a child of the sweep's parent run (`extras["mlflow_parent_run_id"]`).
    """

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    @classmethod
    def for_worker(cls, cfg: Any, extras: Mapping[str, Any], is_main: bool) -> "RunTracker":
        if not (is_main and cfg.tracking.enabled):
            return cls(Tracker.disabled())
        uri = extras.get("mlflow_uri") or resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir)
        tracker = Tracker(uri)
        run_name = cfg.tracking.run_name or Path(cfg.output_dir).name
        tracker.start(cfg.tracking.experiment, run_name=run_name,
                      tags={"orpo.beta": cfg.orpo.beta, "output_dir": str(Path(cfg.output_dir).resolve())},
                      parent_run_id=extras.get("mlflow_parent_run_id"))
        return cls(tracker)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def finish(self, cfg: Any, history: Sequence[Mapping[str, Any]], out_dir: Path) -> None:
        """Plots, config, results, quarantine report and the exported model as artifacts; then end the run."""
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
        for name in ("model", "merged"):  # merged: LoRA adapters folded into a plain model (export.merge_lora)
            if (out_dir / name).is_dir():
                self.tracker.log_artifacts(out_dir / name, name)
        self.tracker.end("FINISHED")


def _yaml_dump(values: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(values), sort_keys=False)
