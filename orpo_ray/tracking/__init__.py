"""Experiment tracking: MLflow (never fatal, rank 0 only), plots, and the per-run policy.

* `mlflow_tracker` - the only module that imports ``mlflow``: `Tracker`, URI resolution, param flattening.
* `plots`          - training curves, sweep heat map, λ and SFT-vs-ORPO figures (matplotlib, Agg).
* `run`            - `RunTracker`: what one training run logs.
"""

from orpo_ray.tracking.mlflow_tracker import (
           Tracker,
           flatten_params,
           resolve_tracking_uri,
           sanitize_key,
)
from orpo_ray.tracking.plots import plot_heatmap, plot_training_curves
from orpo_ray.tracking.run import RunTracker

__all__ = ["Tracker", "RunTracker", "flatten_params", "resolve_tracking_uri", "sanitize_key", "plot_heatmap",
           "plot_training_curves"]
