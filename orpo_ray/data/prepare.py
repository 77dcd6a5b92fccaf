"""From a config to tokenized train/eval rows, in one process (no Ray).

Used by the in-process runtime, by `orpo-ray eval` and by `orpo-ray data-report`. The Ray Data path
(`ray_pipeline.py`) calls the same per-row functions (`records.read_pairs`, `tokenize.tokenize_row`) inside
Ray tasks and the same data policy (`policy.select_split`), so both paths apply one truncation policy, one
quarantine policy and one data policy.

Pure module: no ray, no deepspeed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from orpo_ray.config import Config
from orpo_ray.data.hf import default_eval_input, resolve_input
from orpo_ray.data.policy import data_stats, require_train_pairs, select_split
from orpo_ray.data.records import (
    PreferencePair,
    Quarantined,
    read_pairs,
    write_quarantine,
)
from orpo_ray.data.synthetic import write_synthetic_split
from orpo_ray.data.tokenize import tokenize_row, use_chat_template


@dataclass
class DataSources:
    """Resolved inputs (files or save_to_disk split directories): what a run actually trains and evaluates on."""

    train_path: str
    eval_path: str | None  # None: split eval_fraction off train_path
    synthetic: bool


@dataclass
class PreparedData:
    """Tokenized rows (token columns + source, row and the policy's flags) and what `policy` reports about them."""

    train_rows: list[dict]
    eval_rows: list[dict]
    quarantined: list[Quarantined] = field(default_factory=list)
    sources: DataSources | None = None
    stats: dict = field(default_factory=dict)  # policy.data_stats; the Ray path's stats have the same keys
    pairs: dict = field(default_factory=dict)  # (source, row) -> PreferencePair of every kept row (data-report)


def resolve_sources(cfg: Config) -> DataSources:
    """Synthetic data is written as JSONL under output_dir/data, so every path reads files the same way.

    A saved DatasetDict (or a hub id, downloaded once under the cache dir) becomes the directory of
    data.train_split / data.eval_split; with no eval_path, its eval_split serves as eval data if it has one.
    """
    d = cfg.data
    if d.train_path is None:
        s = d.synthetic
        out = Path(cfg.output_dir).resolve() / "data"
        train, evalp = write_synthetic_split(out, s.task, s.num_train, s.num_eval, s.seed)
        return DataSources(str(train), str(evalp), synthetic=True)
    # Absolute paths: Ray Data tasks may run in another working directory.
    absolute = lambda p: str(Path(p).expanduser().resolve()) if p and "://" not in p else p  # noqa: E731
    hub_root = Path(d.cache_dir or Path(cfg.output_dir) / "cache").expanduser().resolve() / "hf"
    train = absolute(d.train_path)
    if d.eval_path is not None:
        evalp = resolve_input(absolute(d.eval_path), d.eval_split, hub_root)
    else:
        evalp = default_eval_input(train, d.eval_split, hub_root) if d.eval_split != d.train_split else None
    return DataSources(resolve_input(train, d.train_split, hub_root), evalp, synthetic=False)


def split_for_eval(pairs: list, fraction: float) -> tuple[list, list]:
    """Deterministic split that does not depend on file order: hash of the row's source position."""
    def bucket(p: PreferencePair) -> float:
        h = hashlib.sha1(f"{p.source}:{p.row}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    train = [p for p in pairs if bucket(p) >= fraction]
    evals = [p for p in pairs if bucket(p) < fraction]
    return train, evals


def read_splits(cfg: Config) -> tuple[list, list, list[Quarantined], DataSources]:
    """Parsed (not yet tokenized) train and eval pairs, the rows quarantined while reading, and the sources.
    No limits yet: `policy.select_split` applies them."""
    d = cfg.data
    sources = resolve_sources(cfg)
    train_pairs, quarantined = read_pairs(sources.train_path, d.format, d.max_chars, d.on_damaged_file)
    if sources.eval_path is not None:
        eval_pairs, eval_q = read_pairs(sources.eval_path, d.format, d.max_chars, d.on_damaged_file)
        quarantined += eval_q
    else:
        train_pairs, eval_pairs = split_for_eval(train_pairs, d.eval_fraction)
    return train_pairs, eval_pairs, quarantined, sources


def pair_key(pair: PreferencePair) -> tuple[str, int]:
    return pair.source, pair.row


def prepare_data(cfg: Config, tokenizer) -> PreparedData:
    """Read, parse, split, tokenize under `policy`; quarantined rows are kept (with reasons) for the run."""
    d = cfg.data
    use_chat_template(tokenizer, d.chat_template)
    train_pairs, eval_pairs, read_quarantine, sources = read_splits(cfg)
    outcome = lambda pair: tokenize_row(pair, tokenizer, d.max_length, d.max_prompt_length)  # noqa: E731
    train, evals = (select_split(pairs, pair_key, outcome, limit, d.drop_identical_pairs)
                    for pairs, limit in ((train_pairs, d.max_train_pairs), (eval_pairs, d.max_eval_pairs)))
    quarantined = read_quarantine + train.quarantined + evals.quarantined
    require_train_pairs(train, quarantined, sources.train_path)
    by_key = {pair_key(p): p for p in train_pairs + eval_pairs}
    pairs = {(r["source"], r["row"]): by_key[(r["source"], r["row"])] for r in train.kept + evals.kept}
    return PreparedData(train.kept, evals.kept, quarantined, sources, data_stats(train, evals, read_quarantine, len(train_pairs) + len(eval_pairs)), pairs)


def save_quarantine(prepared: PreparedData, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "quarantine.jsonl"
    write_quarantine(path, prepared.quarantined)
    return path


CACHE_FORMAT = 2  # bump when the cached rows' layout or the tokenization policy changes


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides a tokenizer's output: vocabulary and merges (the fast tokenizer's full JSON:
    model, normalizer, pre-tokenizer, added tokens), special tokens and their ids, and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = {name: [getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)]
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    parts = [type(tokenizer).__name__, content, specials, getattr(tokenizer, "chat_template", None)]
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(root: Path) -> list:
    """(relative path, size, mtime in ns, inode) of a file or of every file in a directory: a rewrite within the
    same second changes mtime_ns (and usually the inode), where whole seconds would not."""
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    return [[str(f.relative_to(root)) if root.is_dir() else f.name, st.st_size, st.st_mtime_ns, st.st_ino]
            for f in files for st in [f.stat()]]


def fingerprint(cfg: Config, tokenizer) -> str:
    """Key for the tokenized cache: everything that decides its content - the input files' identity, the data
    and truncation settings, the tokenizer's content (`tokenizer_fingerprint`) and the cache format."""
    d = cfg.data
    parts = {
        "format_version": CACHE_FORMAT,
        "train": d.train_path, "eval": d.eval_path, "train_split": d.train_split, "eval_split": d.eval_split,
        "format": d.format, "max_length": d.max_length, "max_chars": d.max_chars, "on_damaged_file": d.on_damaged_file,
        "max_prompt_length": d.max_prompt_length, "eval_fraction": d.eval_fraction,
        "synthetic": vars(d.synthetic) if d.train_path is None else None,
        "max_train_pairs": d.max_train_pairs, "max_eval_pairs": d.max_eval_pairs,
        "drop_identical_pairs": d.drop_identical_pairs,
        "tokenizer": tokenizer_fingerprint(tokenizer),  # callers applied data.chat_template to it already
        "chat_template": d.chat_template,
    }
    if d.chat_template and Path(d.chat_template).is_file():
        parts["chat_template_file"] = _file_identity(Path(d.chat_template))
    for key in ("train", "eval"):
        p = parts[key]
        if p and "://" not in p and Path(p).exists():  # a save_to_disk directory: every file in it
            parts[f"{key}_files"] = _file_identity(Path(p))
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
