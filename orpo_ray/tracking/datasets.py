"""A run's train and eval data as tracker dataset inputs: source, row counts and a content digest.

The digest covers the source bytes and the settings that choose and cut pairs (limits, lengths, eval split),
so two runs with the same digest trained on the same pairs, and a changed file or limit shows as a new one.
Pure: no tracker, no Ray.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orpo_ray.tracking.protocol import DatasetInfo

_CHUNK = 1 << 20


def source_digest(source: str | None, settings: Mapping[str, Any]) -> str:
    """sha256 (16 hex) of a file's bytes, every file of a directory, or the source string itself (hub id,
    synthetic task), plus `settings`."""
    h = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    path = Path(source) if source and "://" not in source else None
    files = [] if path is None else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else (
        [path] if path.is_file() else [])
    if not files:
        h.update(str(source).encode())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def dataset_inputs(cfg: Any, data_stats: Mapping[str, Any]) -> list[DatasetInfo]:
    """The train and eval inputs of a run of `cfg` that prepared `data_stats` (train_pairs, eval_pairs, ...)."""
    d = cfg.data
    if d.train_path is None:
        s = d.synthetic
        train_source = f"synthetic:{s.task} (orpo_ray.data.synthetic, seed {s.seed})"
        eval_source = train_source
        settings = {"synthetic": vars(s)}
        name = f"synthetic-{s.task}"
    else:
        train_source = str(d.train_path)
        eval_source = str(d.eval_path) if d.eval_path else f"{d.train_path} (eval_fraction {d.eval_fraction:g})"
        settings = {}
        name = Path(str(d.train_path).rstrip("/")).name
    settings |= {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "format": d.format,
                 "drop_identical_pairs": d.drop_identical_pairs, "eval_fraction": None if d.eval_path else d.eval_fraction}
    counts = {"quarantined": data_stats.get("quarantined", 0), "truncated_pairs": data_stats.get("truncated_pairs", 0)}
    train_settings = settings | {"split": d.train_split, "max_pairs": d.max_train_pairs}
    eval_settings = settings | {"split": d.eval_split, "max_pairs": d.max_eval_pairs}
    return [
        DatasetInfo(f"{name}-train", "train", train_source,
                    source_digest(None if d.train_path is None else train_source, train_settings),
                    {"num_rows": data_stats.get("train_pairs"), **counts}),
        DatasetInfo(f"{name}-eval", "eval", eval_source,
                    source_digest(None if d.train_path is None else (d.eval_path or d.train_path), eval_settings),
                    {"num_rows": data_stats.get("eval_pairs"), **counts}),
    ]
