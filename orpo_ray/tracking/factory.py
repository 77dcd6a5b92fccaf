"""The one place a tracker is built from config: `make_tracker(cfg)`.

Every caller (the training loop's rank 0, eval, data-report, evidence, the tune driver) goes through here, so
"tracking off", "not rank 0", the URI a sweep hands its trials and the choice of backend are decided once.
A backend is a function `(cfg, uri, enabled) -> ExperimentTracker`; adding one is one file and one entry in
`BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orpo_ray.config import ConfigError
from orpo_ray.tracking.protocol import ExperimentTracker


def _mlflow(cfg: Any, uri: str | None, enabled: bool) -> ExperimentTracker:
    from orpo_ray.tracking.mlflow_tracker import Tracker, resolve_tracking_uri

    if not enabled:
        return Tracker.disabled()
    return Tracker(uri or resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir))


BACKENDS: dict[str, Callable[[Any, str | None, bool], ExperimentTracker]] = {"mlflow": _mlflow}


def make_tracker(cfg: Any, *, main: bool = True, uri: str | None = None) -> ExperimentTracker:
    """The tracker `cfg.tracking` asks for; a no-op one when tracking is off or this process is not rank 0.

    `uri`: where a parent run lives (a sweep's or evidence run's `tracker.tracking_uri`), so its children log
    to the same store from other processes.
    """
    name = cfg.tracking.backend
    if name not in BACKENDS:
        raise ConfigError(f"tracking.backend={name!r} is not a tracking backend; one of {sorted(BACKENDS)}")
    return BACKENDS[name](cfg, uri, bool(main and cfg.tracking.enabled))
