"""A tracker backend in one file: records every call instead of sending it anywhere (the test double of
`orpo_ray.tracking.ExperimentTracker`). Register it with `BACKENDS["recording"] = RecordingTracker.backend`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RecordingTracker:
    def __init__(self, enabled: bool = True, uri: str | None = "recording://"):
        self.enabled = enabled
        self.tracking_uri = uri if enabled else None
        self.calls: list[tuple] = []
        self._runs: list[str] = []

    @classmethod
    def backend(cls, cfg: Any, uri: str | None, enabled: bool) -> "RecordingTracker":
        return cls(enabled, uri or "recording://")

    @property
    def run_id(self) -> str | None:
        return self._runs[-1] if self._runs else None

    def ui_link(self) -> str | None:
        return None

    def _record(self, *call: Any) -> None:
        if self.enabled:
            self.calls.append(call)

    def start(self, experiment, run_name=None, tags=None, parent_run_id=None, nested=False):
        if not self.enabled:
            return None
        self._runs.append(f"run{len(self.calls)}")
        self._record("start", experiment, run_name, dict(tags or {}), parent_run_id)
        return self.run_id

    def attach(self, experiment, run_id):
        self._runs.append(run_id)
        return run_id

    def child(self, run_name=None, tags=None):
        kid = RecordingTracker(self.enabled, self.tracking_uri)
        kid.start("", run_name, tags, parent_run_id=self.run_id)
        return kid

    def log_params(self, params):
        self._record("params", dict(params))

    def log_metrics(self, metrics, step):
        self._record("metrics", dict(metrics), step)

    def set_tags(self, tags, run_id=None):
        self._record("tags", dict(tags), run_id)

    def log_artifact(self, path, artifact_path=None):
        self._record("file", Path(path).name, artifact_path)

    def log_artifacts(self, local_dir, artifact_path=None):
        self._record("dir", Path(local_dir).name, artifact_path)

    def log_dataset(self, dataset):
        self._record("dataset", dataset)

    def log_model(self, model_dir, *, name="model", model=None, tokenizer=None, adapter=False):
        self._record("model", Path(model_dir).name, name, model is not None, adapter)
        return f"model-{name}"

    def register_model(self, name, run_id, tags=None):
        self._record("register", name, run_id, dict(tags or {}))
        return "1"

    def start_system_metrics(self, interval_s):
        self._record("system_metrics", interval_s)

    def end_open_children(self, status="KILLED"):
        self._record("end_children", status)

    def end(self, status="FINISHED"):
        if self._runs:
            self._runs.pop()
            self._record("end", status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        while self._runs:
            self.end("FINISHED" if exc_type is None else "FAILED")

    def named(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]
