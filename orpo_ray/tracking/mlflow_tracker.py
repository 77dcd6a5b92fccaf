"""MLflow tracking and training-curve plots for orpo-ray.

This is the only module of the project that imports ``mlflow`` (and it imports
``mlflow`` and ``matplotlib`` lazily, inside functions, so ``import
orpo_ray.tracking`` stays cheap for Ray workers that never log anything).

Rules:

* Tracking is **never fatal**. The first exception raised by MLflow (server down,
  unreachable host, bad URI, locked database, ...) is reported by ONE warning on
  the ``orpo_ray.tracking`` logger, naming the tracking URI and the error, and the
  tracker turns into a no-op for the rest of the run. Training goes on.
* Only rank 0 should own a real :class:`Tracker`; other ranks use
  :meth:`Tracker.disabled`, whose methods do nothing.
* Runs are addressed through ``mlflow.MlflowClient`` with explicit run ids, never
  through MLflow's global active-run stack, so nested sweeps and threads are safe.
* HTTP failures are kept short: unless already set in the environment,
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` and
  ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set to small values, and an http(s) tracking
  server is probed with a plain TCP connect (a few seconds at most) before MLflow is
  even imported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orpo_ray.console import verbose
from orpo_ray.results import finite_float
from orpo_ray.tracking.protocol import DatasetInfo

logger = logging.getLogger("orpo_ray.tracking")  # one logger name for the package (tests and users filter on it)

# MLflow limits (mlflow/utils/validation.py, 3.17).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Defaults written into the environment (setdefault: a value the user set wins).
DEFAULT_HTTP_TIMEOUT_S = 10
DEFAULT_HTTP_MAX_RETRIES = 2
DEFAULT_HTTP_BACKOFF_FACTOR = 1
DEFAULT_PREFLIGHT_TIMEOUT_S = 3.0

_PASS_THROUGH_SCHEMES = (
    "http",
    "https",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "file",
)
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# The MLflow UI (3.x) opens an experiment in its GenAI view unless this experiment tag says otherwise; the
# values are the UI's ExperimentKind enum (mlflow/server/js, "custom_model_development" = "Model training").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"


# ----------------------------------------------------------------------------------
# URIs
# ----------------------------------------------------------------------------------


def _sqlite_uri(path: str | os.PathLike[str]) -> str:
    # sqlite:/// + absolute POSIX path -> four slashes, e.g. sqlite:////work/out/mlflow.db
    return "sqlite:///" + Path(path).expanduser().resolve().as_posix()


def resolve_tracking_uri(uri: str | None, output_dir: str | os.PathLike[str]) -> str:
    """Turn the configured tracking URI into one MLflow can use from any process.

    * ``None`` / ``""`` -> ``sqlite:///<absolute output_dir>/mlflow.db`` (no server needed).
    * ``http(s)://...``, ``postgresql://...``, ``mysql://...``, ``databricks``,
      ``file:...`` pass through unchanged.
    * ``sqlite:///...`` passes through; a *relative* sqlite path is made absolute
      (relative to the current directory), because Ray workers run in other directories.
    * a plain path ending in ``.db`` -> ``sqlite:///<absolute path>``.
    * anything else raises ``ValueError`` naming the value.
    """
    if uri is None or str(uri).strip() == "":
        return _sqlite_uri(Path(output_dir) / "mlflow.db")
    uri = str(uri).strip()
    if uri.startswith("sqlite:"):
        if uri == "sqlite://" or uri.startswith("sqlite:///:memory:"):
            raise ValueError(
                f"tracking_uri {uri!r}: an in-memory SQLite store cannot be shared between "
                "processes; use sqlite:////abs/path/mlflow.db or an http(s):// server"
            )
        if not uri.startswith("sqlite:///"):
            raise ValueError(f"tracking_uri {uri!r}: expected sqlite:///<path to .db file>")
        path = uri[len("sqlite:///") :]
        if path.startswith("/"):
            return uri
        return _sqlite_uri(path)
    if uri == "databricks" or uri.startswith("databricks://"):
        return uri
    scheme = urlsplit(uri).scheme.lower()
    if scheme in _PASS_THROUGH_SCHEMES or scheme.startswith(("postgresql+", "mysql+", "mssql+")):
        if scheme in ("http", "https") and not urlsplit(uri).hostname:
            raise ValueError(f"tracking_uri {uri!r}: no host in http(s) URI")
        return uri
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive
        raise ValueError(
            f"tracking_uri {uri!r}: unsupported scheme {scheme!r}; use http(s)://host:port, "
            "sqlite:////abs/path/mlflow.db, a path ending in .db, or leave it empty for "
            "<output_dir>/mlflow.db"
        )
    if uri.endswith(".db"):
        return _sqlite_uri(uri)
    raise ValueError(
        f"tracking_uri {uri!r} is a plain path that does not end in .db; give a SQLite file "
        "(e.g. runs/mlflow.db), an http(s)://host:port server, or leave it empty for "
        "<output_dir>/mlflow.db"
    )


def _sqlite_db_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


# ----------------------------------------------------------------------------------
# Params / names
# ----------------------------------------------------------------------------------


def flatten_params(config: Any, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten a nested config (mappings and dataclasses) into ``{"a.b.c": "value"}``.

    Leaves become strings: lists/tuples and other non-scalars as JSON (``default=str``),
    ``None`` as ``"None"``. An empty mapping becomes ``"{}"`` so the key is still visible.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out: dict[str, str] = {}
    if isinstance(config, Mapping):
        if not config and prefix:
            out[prefix] = "{}"
        for key, value in config.items():
            full = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping) or (
                dataclasses.is_dataclass(value) and not isinstance(value, type)
            ):
                out.update(flatten_params(value, full, sep))
            else:
                out[full] = _param_str(value)
        return out
    if not prefix:
        raise TypeError(f"flatten_params expects a mapping or dataclass, got {type(config)!r}")
    out[prefix] = _param_str(config)
    return out


def _param_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        try:
            return json.dumps(list(value), default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def sanitize_key(name: str) -> str:
    """Make ``name`` an acceptable MLflow metric/param/tag key ('/' is allowed and kept)."""
    key = _INVALID_NAME_CHARS.sub("_", str(name))
    key = re.sub(r"/{2,}", "/", key).strip("/")
    parts = [p for p in key.split("/") if p not in ("", ".", "..")]
    key = "/".join(parts) or "_"
    if posixpath.normpath(key) != key:  # e.g. a trailing '.' component
        key = key.replace(".", "_")
    return key[:MAX_KEY_LENGTH]




# ----------------------------------------------------------------------------------
# Tracker
# ----------------------------------------------------------------------------------


def _configure_http_env(timeout_s: int, max_retries: int, backoff_factor: int) -> None:
    # Names checked against mlflow/environment_variables.py (3.17). MLflow reads them at
    # request time, so setting them before the first request is enough.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(max_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(int(backoff_factor)))


class _Shared:
    """State shared by a tracker and its child trackers (one client, one off-switch)."""

    def __init__(self, tracking_uri: str | None, enabled: bool) -> None:
        self.tracking_uri = tracking_uri
        self.enabled = enabled
        self.client: Any = None
        self.lock = threading.RLock()
        self.warned_keys: set[str] = set()


class Tracker:
    """Rank-0 MLflow tracker that can never crash training.

    >>> tracker = Tracker(resolve_tracking_uri(cfg.tracking_uri, cfg.output_dir))
    >>> with tracker:
    ...     tracker.start("orpo", run_name="tiny", tags={"task": "demo"})
    ...     tracker.log_params(cfg_dict)               # nested -> dotted keys
    ...     tracker.log_metrics({"loss": 1.2, "rewards/margins": 0.1}, step=10)
    ...     tracker.log_artifact("outputs/results.json")

    Nesting: ``start(..., nested=True)`` while a run is open starts a child of it (and
    ``end()`` returns to the parent); ``start(..., parent_run_id=pid)`` makes a child of
    any run (e.g. a Ray Tune trial of a sweep's parent run); :meth:`child` gives an
    independent tracker for a child run (use one per thread).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        *,
        artifact_location: str | None = None,
        http_timeout_s: int = DEFAULT_HTTP_TIMEOUT_S,
        http_max_retries: int = DEFAULT_HTTP_MAX_RETRIES,
        preflight_timeout_s: float = DEFAULT_PREFLIGHT_TIMEOUT_S,
        _shared: _Shared | None = None,
    ) -> None:
        self._shared = _shared or _Shared(tracking_uri, enabled=tracking_uri is not None)
        self._artifact_location = artifact_location
        self._http_timeout_s = http_timeout_s
        self._http_max_retries = http_max_retries
        self._preflight_timeout_s = preflight_timeout_s
        self._runs: list[str] = []  # stack of open runs; [-1] is the current one
        self._experiment_id: str | None = None
        self._params_by_run: dict[str | None, dict[str, str]] = {}
        self._monitors: dict[str, Any] = {}  # run id -> mlflow SystemMetricsMonitor

    # -- construction --------------------------------------------------------------

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker whose every method is a no-op (for ranks other than 0)."""
        return cls(None)

    def child(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> Tracker:
        """A new tracker owning a child run of this tracker's current run.

        It shares the client and the off-switch with its parent (if the server dies, all
        go quiet after one warning), but has its own run stack, so it can be used from
        another thread.
        """
        kid = Tracker(
            self._shared.tracking_uri,
            artifact_location=self._artifact_location,
            http_timeout_s=self._http_timeout_s,
            http_max_retries=self._http_max_retries,
            preflight_timeout_s=self._preflight_timeout_s,
            _shared=self._shared,
        )
        kid._experiment_id = self._experiment_id
        if self.run_id is not None and self._experiment_id is not None:
            kid._start_run(self._experiment_id, run_name, tags, parent_run_id=self.run_id)
        return kid

    # -- properties ----------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._shared.enabled

    @property
    def tracking_uri(self) -> str | None:
        return self._shared.tracking_uri

    @property
    def run_id(self) -> str | None:
        return self._runs[-1] if self._runs else None

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    def ui_link(self) -> str | None:
        """The current run's page on an http(s) tracking server, in the UI's model-training view. MLflow 3.17's UI
        picks GenAI or model training from a global switch (the `workflowType` URL parameter, else the browser's
        last choice, GenAI by default), not from the experiment's kind tag, so the link carries the parameter."""
        uri, run_id = self._shared.tracking_uri or "", self.run_id
        if not (run_id and self._experiment_id and urlsplit(uri).scheme in ("http", "https")):
            return None
        return f"{uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{run_id}?workflowType=machine_learning"

    # -- failure handling ------------------------------------------------------------

    def _disable(self, action: str, err: BaseException) -> None:
        with self._shared.lock:
            if not self._shared.enabled:
                return
            self._shared.enabled = False
        logger.warning(
            "MLflow tracking disabled for the rest of this run: %s against tracking URI %r "
            "failed with %s: %s. Training continues without tracking.",
            action,
            self._shared.tracking_uri,
            type(err).__name__,
            _one_line(err),
        )

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        with self._shared.lock:
            if key in self._shared.warned_keys:
                return
            self._shared.warned_keys.add(key)
        logger.warning(msg, *args)

    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one MLflow call; the first exception switches tracking off (never raises)."""
        if not self._shared.enabled:
            return None
        try:
            client = self._client()
            if client is None:
                return None
            return fn(client, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never be fatal
            self._disable(action, err)
            return None

    def _client(self) -> Any:
        shared = self._shared
        with shared.lock:
            if shared.client is not None or not shared.enabled:
                return shared.client
            uri = shared.tracking_uri
            assert uri is not None
            _configure_http_env(
                self._http_timeout_s, self._http_max_retries, DEFAULT_HTTP_BACKOFF_FACTOR
            )
            parts = urlsplit(uri)
            if parts.scheme in ("http", "https"):
                port = parts.port or (443 if parts.scheme == "https" else 80)
                # A TCP connect costs milliseconds when nothing listens and at most
                # preflight_timeout_s for a black-holed host; MLflow is not even imported.
                with socket.create_connection((parts.hostname, port), self._preflight_timeout_s):
                    pass
            db = _sqlite_db_path(uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            from mlflow import MlflowClient

            shared.client = MlflowClient(tracking_uri=uri)
            return shared.client

    # -- runs ------------------------------------------------------------------------

    def start(
        self,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        nested: bool = False,
    ) -> str | None:
        """Start a run in ``experiment`` (created if missing); returns its id (None if off).

        ``nested=True`` makes it a child of this tracker's current run;
        ``parent_run_id`` makes it a child of that run (tag ``mlflow.parentRunId``).
        """
        if not self._shared.enabled:
            return None
        if self._runs and not nested and parent_run_id is None:
            self._warn_once(
                "start-while-active",
                "Tracker.start(%r) called while run %s is open; keeping that run "
                "(pass nested=True for a child run)",
                run_name,
                self.run_id,
            )
            return self.run_id
        if nested and parent_run_id is None:
            parent_run_id = self.run_id
            if parent_run_id is None:
                self._warn_once(
                    "nested-no-parent",
                    "Tracker.start(nested=True) without an open run or parent_run_id; "
                    "starting a top-level run",
                )
        exp_id = self._call("get/create experiment " + repr(experiment), self._get_experiment, experiment)
        if exp_id is None:
            return None
        self._experiment_id = exp_id
        return self._start_run(exp_id, run_name, tags, parent_run_id)

    def _get_experiment(self, client: Any, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = self._artifact_location
            db = _sqlite_db_path(self._shared.tracking_uri or "")
            if location is None and db is not None:
                # MLflow's default for a SQLite store is ./mlruns relative to the *current
                # directory*; keep artifacts next to the database instead.
                location = (db.parent / "mlartifacts").resolve().as_uri()
            try:
                return client.create_experiment(name, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING})
            except Exception:
                # Another process may have created it in between (RESOURCE_ALREADY_EXISTS).
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND_TRAINING:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)
        return exp.experiment_id

    def _start_run(
        self,
        exp_id: str,
        run_name: str | None,
        tags: Mapping[str, Any] | None,
        parent_run_id: str | None,
    ) -> str | None:
        all_tags = self._clean_tags(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id

        def create(client: Any) -> str:
            run = client.create_run(exp_id, tags=all_tags, run_name=run_name)
            return run.info.run_id

        run_id = self._call(f"create run {run_name!r}", create)
        if run_id is not None:
            self._runs.append(run_id)
        return run_id

    def attach(self, experiment: str, run_id: str) -> str | None:
        """Continue an existing run (e.g. a resumed sweep's parent): mark it RUNNING and make it current."""
        if not self._shared.enabled:
            return None
        exp_id = self._call("get/create experiment " + repr(experiment), self._get_experiment, experiment)
        if exp_id is None:
            return None
        self._call(f"reopen run {run_id}", lambda c: c.update_run(run_id, "RUNNING"))
        if not self._shared.enabled:  # the run id was unknown to this server, or the server went away
            return None
        self._experiment_id = exp_id
        self._runs.append(run_id)
        return run_id

    def end_open_children(self, status: str = "KILLED") -> None:
        """End the current run's child runs still marked RUNNING (their process was stopped from outside,
        e.g. a Tune trial that ASHA stopped)."""
        run_id = self._active()
        if run_id is None:
            return

        def end_children(client: Any) -> None:
            runs = client.search_runs([self._experiment_id],
                                      f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
            for run in runs:
                client.set_terminated(run.info.run_id, status)

        self._call("end open child runs", end_children)

    def end(self, status: str = "FINISHED") -> None:
        """End the current run (``FINISHED``, ``FAILED`` or ``KILLED``); back to its parent."""
        if not self._runs:
            return
        status = status.upper()
        if status not in _RUN_STATUSES:
            self._warn_once(f"bad-status-{status}", "unknown run status %r; using FAILED", status)
            status = "FAILED"
        run_id = self._runs.pop()
        self._params_by_run.pop(run_id, None)
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            monitor.finish()  # joins its thread and logs the last sample before the run ends
        self._call(f"end run {run_id}", lambda c: c.set_terminated(run_id, status))

    def end_all(self, status: str = "FINISHED") -> None:
        while self._runs:
            self.end(status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.end_all(status)

    # -- logging ---------------------------------------------------------------------

    def _active(self) -> str | None:
        if not self._shared.enabled:
            return None
        if not self._runs:
            self._warn_once("no-run", "Tracker: logging call before start(); ignored")
            return None
        return self._runs[-1]

    def _key(self, name: Any, kind: str) -> str:
        key = sanitize_key(name)
        if key != name:
            self._warn_once(
                f"key-{name}", "MLflow %s name %r is not allowed; logging it as %r", kind, name, key
            )
        return key

    def _clean_tags(self, tags: Mapping[str, Any]) -> dict[str, str]:
        return {
            self._key(k, "tag"): _truncate(_param_str(v), MAX_TAG_VALUE_LENGTH)
            for k, v in tags.items()
        }

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log params; nested mappings/dataclasses are flattened to dotted keys.

        Values are truncated to MLflow's 6000 characters and sent in batches of 100.
        MLflow params are immutable: re-logging a key with the same value is skipped, and
        with a different value it is skipped with a warning (instead of an MLflow error).
        """
        run_id = self._active()
        if run_id is None:
            return
        todo = self._prepare_params(params)
        if not todo:
            return
        from mlflow.entities import Param

        items = list(todo.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = [Param(k, v) for k, v in items[i : i + MAX_PARAMS_PER_BATCH]]
            self._call("log params", lambda c, ch=chunk: c.log_batch(run_id, params=ch))
            if not self._shared.enabled:
                return
            self._logged_params.update({p.key: p.value for p in chunk})

    @property
    def _logged_params(self) -> dict[str, str]:
        return self._params_by_run.setdefault(self.run_id, {})

    def _prepare_params(self, params: Mapping[str, Any] | Any) -> dict[str, str]:
        """Flatten, sanitize, truncate, and drop keys already logged (pure; no MLflow)."""
        todo: dict[str, str] = {}
        for raw_key, value in flatten_params(params).items():
            key = self._key(raw_key, "param")
            value = _truncate(value, MAX_PARAM_VALUE_LENGTH)
            old = self._logged_params.get(key)
            if old is not None:
                if old != value:
                    self._warn_once(
                        f"param-change-{key}",
                        "param %r already logged as %r; MLflow params are immutable, "
                        "ignoring new value %r",
                        key,
                        old,
                        value,
                    )
                continue
            todo[key] = value
        return todo

    def _prepare_metrics(self, metrics: Mapping[str, Any], step: int) -> list[tuple[str, float]]:
        """Sanitize names, convert values, drop non-finite ones (pure; no MLflow)."""
        out = []
        for raw_key, raw in metrics.items():
            value = finite_float(raw)
            if value is None:
                self._warn_once(
                    f"nonfinite-{raw_key}",
                    "skipping metric %r = %r at step %d: not a finite number "
                    "(further skips of this metric are silent)",
                    raw_key,
                    raw,
                    step,
                )
                continue
            out.append((self._key(raw_key, "metric"), value))
        return out

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at ``step``; names may contain '/' (e.g. ``rewards/chosen``).

        Tensors/numpy scalars are converted; NaN/inf and non-numbers are skipped with a
        warning (once per metric name).
        """
        run_id = self._active()
        if run_id is None:
            return
        prepared = self._prepare_metrics(metrics, step)
        if not prepared:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(key, value, ts, int(step)) for key, value in prepared]
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[i : i + MAX_METRICS_PER_BATCH]
            self._call("log metrics", lambda c, ch=chunk: c.log_batch(run_id, metrics=ch))

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        """Tags on the current run, or on `run_id` (any run of this server, e.g. a sweep's best child)."""
        run_id = run_id if run_id and self._shared.enabled else self._active()
        if run_id is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            self._call("set tags", lambda c, ch=chunk: c.log_batch(run_id, tags=ch))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        run_id = self._active()
        if run_id is None:
            return
        if not Path(path).is_file():
            self._warn_once(f"missing-{path}", "log_artifact: %s is not a file; skipped", path)
            return
        self._call(
            f"log artifact {os.fspath(path)!r}",
            lambda c: c.log_artifact(run_id, os.fspath(path), artifact_path),
        )

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        run_id = self._active()
        if run_id is None:
            return
        if not Path(local_dir).is_dir():
            self._warn_once(
                f"missing-{local_dir}", "log_artifacts: %s is not a directory; skipped", local_dir
            )
            return
        self._call(
            f"log artifacts {os.fspath(local_dir)!r}",
            lambda c: c.log_artifacts(run_id, os.fspath(local_dir), artifact_path),
        )

    # -- inputs, models, system metrics ------------------------------------------------

    def log_dataset(self, dataset: DatasetInfo) -> None:
        """A dataset input of the current run (the runs table's Dataset column; the digest tells runs apart)."""
        run_id = self._active()
        if run_id is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(name=_truncate(dataset.name, 500), digest=dataset.digest[:36], source_type="local",
                         source=json.dumps({"uri": dataset.source}), profile=json.dumps(dict(dataset.profile)))
        tags = [InputTag("mlflow.data.context", dataset.context)]
        self._call(f"log dataset {dataset.name!r}",
                   lambda c: c.log_inputs(run_id, datasets=[DatasetInput(entity, tags)]))

    def log_model(self, model_dir: str | os.PathLike[str], *, name: str = "model", model: Any = None,
                  tokenizer: Any = None, adapter: bool = False) -> str | None:
        """Log an exported model as an MLflow model of the current run (the runs table's Models column).

        A plain model in memory goes in the transformers flavour (loadable with mlflow.transformers.load_model);
        a LoRA adapter, or a model the flavour refuses, goes in as the export directory itself (what
        `load_adapter_model` / `from_pretrained` read). Returns the model id.
        """
        run_id = self._active()
        if run_id is None or not Path(model_dir).is_dir():
            return None
        if model is not None and tokenizer is not None and not adapter:
            try:
                return self._log_transformers_model(run_id, name, model, tokenizer)
            except Exception as err:  # noqa: BLE001 - fall back to the directory; tracking stays on
                self._warn_once(f"flavour-{name}", "transformers flavour failed for %s (%s: %s); logging the "
                                "export directory as the model instead", name, type(err).__name__, _one_line(err))
        return self._call(f"log model {os.fspath(model_dir)!r}", self._log_model_dir, run_id, name,
                          os.fspath(model_dir), "lora-adapter" if adapter else "transformers-directory")

    def _log_transformers_model(self, run_id: str, name: str, model: Any, tokenizer: Any) -> str | None:
        client = self._client()
        if client is None:
            return None
        import mlflow
        import torch
        import transformers

        # Created here, in the run's experiment: left to the flavour, the model lands in the process's active
        # experiment (Default), where the run's page and the runs table's Models column do not find it.
        exp_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(exp_id, name=name, source_run_id=run_id)

        # mlflow.<flavour>.log_model has no client argument: it uses the process-wide tracking URI. Its warnings
        # that a local model has no Hub model card or licence say nothing about an exported checkpoint.
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self._shared.tracking_uri)
        flavour_log = logging.getLogger("mlflow.transformers")
        level = flavour_log.level
        flavour_log.setLevel(logging.ERROR)
        try:
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer}, name=name, task="text-generation", run_id=run_id,
                model_id=logged.model_id,
                # explicit requirements: inferring them loads the model again in a subprocess
                pip_requirements=[f"transformers=={transformers.__version__}",
                                  f"torch=={torch.__version__.split('+')[0]}"])
        except Exception:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        finally:
            mlflow.set_tracking_uri(previous)
            flavour_log.setLevel(level)
        return info.model_id

    def _log_model_dir(self, client: Any, run_id: str, name: str, model_dir: str, model_type: str) -> str:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        exp_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type=model_type)
        client.log_model_artifacts(logged.model_id, model_dir)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
        return logged.model_id

    def register_model(self, name: str, run_id: str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Register the model `run_id` logged (its last one) under `name`; returns the new version number."""
        if not (self._shared.enabled and run_id):
            return None
        clean = self._clean_tags(tags or {})

        def register(client: Any) -> str | None:
            exp_id = client.get_run(run_id).info.experiment_id
            models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'")
            if not models:
                self._warn_once(f"no-model-{run_id}", "run %s logged no model; nothing to register", run_id)
                return None
            model = max(models, key=lambda m: m.creation_timestamp)
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name)
            version = client.create_model_version(name, source=model.model_uri, run_id=run_id, tags=clean,
                                                  model_id=model.model_id)
            return version.version

        return self._call(f"register model {name!r}", register)

    def start_system_metrics(self, interval_s: float) -> None:
        """CPU, memory, disk, network (GPU with pynvml) of this machine as system/ metrics of the current run."""
        run_id = self._active()
        if run_id is None or run_id in self._monitors:
            return

        def start(client: Any) -> Any:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Its start/stop INFO lines, once per run (per trial in a sweep), only with --verbose.
            logging.getLogger(SystemMetricsMonitor.__module__).setLevel(logging.NOTSET if verbose() else logging.WARNING)

            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s,
                                           tracking_uri=self._shared.tracking_uri)
            monitor.start()
            return monitor

        monitor = self._call("start system metrics", start)
        if monitor is not None:
            self._monitors[run_id] = monitor


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return _truncate(text, 500)


