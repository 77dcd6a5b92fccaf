"""Experiment tracking: one protocol, one factory, MLflow behind it (never fatal, rank 0 only), plots, run policy.

* `protocol`       - `ExperimentTracker`: what the library calls; `DatasetInfo`: a run's data input.
* `factory`        - `make_tracker(cfg)`: the one place a tracker is built from config (backends in `BACKENDS`).
* `mlflow_tracker` - the only module that imports ``mlflow``: `Tracker`, URI resolution, param flattening.
* `datasets`       - a run's train/eval data as dataset inputs (source, counts, content digest).
* `plots`          - training curves, sweep heat map, λ and SFT-vs-ORPO figures (matplotlib, Agg).
* `run`            - `RunTracker`: what one training run logs.
"""

from orpo_ray.tracking.factory import BACKENDS, make_tracker
from orpo_ray.tracking.mlflow_tracker import (
           Tracker,
           flatten_params,
           resolve_tracking_uri,
           sanitize_key,
)
from orpo_ray.tracking.plots import plot_heatmap, plot_training_curves
from orpo_ray.tracking.protocol import DatasetInfo, ExperimentTracker
from orpo_ray.tracking.run import RunTracker

__all__ = ["BACKENDS", "make_tracker", "ExperimentTracker", "DatasetInfo", "Tracker", "RunTracker", "flatten_params", "resolve_tracking_uri", "sanitize_key", "plot_heatmap",
           "plot_training_curves"]
