"""What the library asks of an experiment tracker: the one interface `make_tracker` returns.

MLflow implements it (`mlflow_tracker.Tracker`); a second backend, or a test double, is one class with these
methods registered in `factory.BACKENDS`. The rules every implementation keeps:

* **never fatal**: a tracking failure is logged once and the tracker goes quiet; training goes on;
* **disabled is a no-op**: ranks other than 0 and `tracking.enabled: false` get a tracker whose methods do
  nothing (`enabled` is False, `run_id` None);
* runs are addressed by id, never by a global "active run", so a sweep's threads and processes are safe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DatasetInfo:
    """One input of a run, as the runs table shows it: a name, where it came from and a content digest.

    `context` is "train" or "eval"; `profile` holds counts (rows, quarantined rows, ...).
    """

    name: str
    context: str
    source: str
    digest: str
    profile: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class ExperimentTracker(Protocol):
    @property
    def enabled(self) -> bool: ...

    @property
    def run_id(self) -> str | None: ...

    @property
    def tracking_uri(self) -> str | None:
        """Where the runs go, in a form another process can use (a sweep hands it to its trials)."""

    def ui_link(self) -> str | None:
        """Where a person reviews the current run (a URL), if the backend has a UI."""

    def start(self, experiment: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, nested: bool = False) -> str | None:
        """Open a run (a child of `parent_run_id` if given); returns its id, None when off."""

    def attach(self, experiment: str, run_id: str) -> str | None:
        """Continue an existing run (a resumed sweep's parent); None if it cannot."""

    def child(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> ExperimentTracker:
        """An independent tracker owning a child run of the current run."""

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Nested mappings/dataclasses become dotted keys (`orpo.beta`)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None: ...

    def log_artifact(self, path: PathLike, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, local_dir: PathLike, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, dataset: DatasetInfo) -> None:
        """Record a train/eval input of the current run."""

    def log_model(self, model_dir: PathLike, *, name: str = "model", model: Any = None, tokenizer: Any = None,
                  adapter: bool = False) -> str | None:
        """Log an exported model as a model of the current run; returns the backend's model id."""

    def register_model(self, name: str, run_id: str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Register the model logged by `run_id` under `name`; returns the new version."""

    def start_system_metrics(self, interval_s: float) -> None:
        """Sample CPU/memory (GPU where present) of this machine into the current run until `end`."""

    def end_open_children(self, status: str = "KILLED") -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> ExperimentTracker: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...
