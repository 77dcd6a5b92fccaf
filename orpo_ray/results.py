"""The ``eval_`` prefix, the log-prob margin and results.json: defined once, used by train, eval, tune, bench, tracking.

Metric names belong to each objective (``orpo_ray.objectives``: ``Objective.metric_names``).

Pure and light (stdlib only), so the trackers and the sweep driver import it without torch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from orpo_ray.config import Config


def with_prefix(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Same values, keys prefixed (``with_prefix(m, "eval_")`` gives TRL's eval names)."""
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def finite_float(value: Any) -> float | None:
    """A float for a Python/torch/numpy scalar, or None when it is not a finite number (NaN, inf, not numeric)."""
    try:
        if hasattr(value, "item"):  # torch / numpy scalars
            value = value.item()
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out if math.isfinite(out) else None


MARGIN_KEY = "logps/margins"


def logp_margin(metrics: Mapping[str, Any], prefix: str = "eval_") -> float:
    """Mean over pairs of (chosen - rejected) mean log-prob; a mean of differences is the difference of means."""
    return float(metrics[f"{prefix}logps/chosen"]) - float(metrics[f"{prefix}logps/rejected"])


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Write ``results`` as JSON with sorted keys, atomically: a reader sees the old file or the new, never half.

    The temporary file lives in the target directory so ``os.replace`` is a same-filesystem rename.
    0-d tensors become numbers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, sort_keys=True, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be readable like any output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def no_eval_reason(cfg: Config) -> str:
    """Why a run has no eval pairs, in the words of the config (results.json keeps it as `eval_skipped`)."""
    d = cfg.data
    if d.max_eval_pairs == 0:
        why = "data.max_eval_pairs=0"
    elif d.eval_path is None and d.eval_fraction == 0:
        why = "data.eval_fraction=0 and no eval data"
    else:
        why = "the eval data gave no pair (rows quarantined - see quarantine.jsonl -, identical pairs dropped, or a split too small)"
    return f"no eval pairs: {why}; nothing was evaluated"
