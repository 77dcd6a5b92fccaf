"""The Ray Data pipeline: preference files -> parsed rows | quarantine -> tokenized Parquet cache.

Parsing and tokenizing run as Ray Data tasks (`flat_map` per input file, `map_batches` per block) using
the same pure functions as the in-process path (`data.read_pairs`, `tokenize.tokenize_batch`), so both
paths share one quarantine policy and one truncation policy. Files are parsed by our own reader rather
than `ray.data.read_json` because a single malformed line makes `read_json` fail the whole dataset,
while we must quarantine it with its line number and go on.

The tokenized result is written once as Parquet under `data.cache_dir/<fingerprint>/` (inputs, their
size and mtime, tokenizer and truncation settings); later runs and every trial of a Tune sweep read the
cache with `ray.data.read_parquet` and stream it to workers.

The training order (which rows form each global micro-batch, and each rank's slice) is data/order.py's,
the same for this streaming path and the in-process one; it derives from the cache's row order, so the
cache stores each split sorted by (source, row), the order `prepare.prepare_data` returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from orpo_ray.config import Config
from orpo_ray.data.prepare import (
    fingerprint,
    identical_responses,
    quarantine_reasons,
    resolve_sources,
    split_for_eval,
)
from orpo_ray.data.records import Quarantined, pair_to_row, read_pairs, write_quarantine
from orpo_ray.data.tokenize import TOKEN_COLUMNS, tokenize_batch, use_chat_template
from orpo_ray.modeling import load_tokenizer

_PAIR_COLUMNS = ["prompt", "chosen", "rejected", "conversational", "source", "row"]


def parse_file(item: dict, fmt: str, eval_fraction: float) -> list[dict]:
    """One input file -> rows with a uniform schema: kind 'pair' (with split) or kind 'quarantine'."""
    pairs, quarantined = read_pairs(item["path"], fmt)
    if item["split"]:
        splits = [(item["split"], pairs)]
    else:
        train, evals = split_for_eval(pairs, eval_fraction)
        splits = [("train", train), ("eval", evals)]
    out = []
    for split, chunk in splits:
        for order, pair in enumerate(chunk):
            row = {k: "" for k in _PAIR_COLUMNS} | pair_to_row(pair)
            out.append({"kind": "pair", "split": split, "order": order, "reason": "", "excerpt": "",
                        **{k: row[k] for k in _PAIR_COLUMNS}})
    for q in quarantined:
        out.append({"kind": "quarantine", "split": "", "order": 0, "prompt": "", "chosen": "", "rejected": "",
                    "source": q.source, "row": q.row, "reason": q.reason, "excerpt": q.excerpt})
    return out


def _build_cache(cfg: Config, tokenizer, cache: Path) -> dict:
    import ray.data

    d = cfg.data
    sources = resolve_sources(cfg)
    items = [{"path": sources.train_path, "split": "train" if sources.eval_path else ""}]
    if sources.eval_path:
        items.append({"path": sources.eval_path, "split": "eval"})
    parsed = ray.data.from_items(items).flat_map(
        parse_file, fn_kwargs={"fmt": d.format, "eval_fraction": d.eval_fraction}).materialize()

    quarantined = [Quarantined(r["source"], int(r["row"]), r["reason"], r["excerpt"])
                   for r in parsed.filter(lambda r: r["kind"] == "quarantine").take_all()]
    tokenized = (parsed.filter(lambda r: r["kind"] == "pair")
                 .map_batches(tokenize_batch, batch_format="numpy", fn_kwargs={
                     "tokenizer": tokenizer, "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                     "keep": ("split", "source", "row", "order")})
                 .materialize())

    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The same keys as prepare.PreparedData.stats; limits apply before identical pairs are dropped, as there.
    stats = {"quarantined": len(quarantined), "quarantined_by_reason": quarantine_reasons(quarantined),
             "truncated_pairs": 0, "identical_pairs": 0, "dropped_identical_pairs": 0,
             "sources": [i["path"] for i in items]}
    for split, limit in (("train", d.max_train_pairs), ("eval", d.max_eval_pairs)):
        # Sort by (source, row) so the cache's row order - and so training order - is reproducible.
        part = tokenized.filter(lambda r, s=split: r["split"] == s).sort(["source", "row"])
        if limit is not None:
            part = part.limit(limit)
        part = part.materialize()
        identical = part.filter(identical_responses).count() if part.count() else 0
        stats["identical_pairs"] += identical
        if d.drop_identical_pairs and identical:
            part = part.filter(lambda r: not identical_responses(r)).materialize()
            stats["dropped_identical_pairs"] += identical
        count = part.count()
        stats[f"{split}_pairs"] = count
        stats["truncated_pairs"] += part.filter(
            lambda r: r["prompt_tokens_cut"] > 0 or r["response_tokens_cut"] > 0).count() if count else 0
        part.select_columns(list(TOKEN_COLUMNS)).repartition(max(1, min(8, count // 2048 + 1))).write_parquet(
            str(tmp / split))
    if stats["train_pairs"] == 0:
        first = quarantined[0].reason if quarantined else "no rows"
        raise ValueError(f"{sources.train_path}: no valid preference pairs ({len(quarantined)} quarantined; first: {first})")
    write_quarantine(tmp / "quarantine.jsonl", quarantined)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)  # readers never see a half-written cache
    return stats


def tokenized_datasets(cfg: Config, tokenizer=None) -> tuple[dict, dict]:
    """{'train': Dataset, 'eval': Dataset} of tokenized rows, and data stats; tokenizes at most once."""
    import ray.data

    tokenizer = use_chat_template(tokenizer or load_tokenizer(cfg.model), cfg.data.chat_template)
    root = Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")
    cache = (root / fingerprint(cfg, tokenizer)).resolve()
    if (cache / "stats.json").exists():
        stats = json.loads((cache / "stats.json").read_text())
        stats["cache"] = "hit"
    else:
        stats = _build_cache(cfg, tokenizer, cache)
        stats["cache"] = "built"
    stats["cache_dir"] = str(cache)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache / "quarantine.jsonl", out / "quarantine.jsonl")
    # Materialised before fit(): with every CPU taken by a training worker, a lazy pipeline would never get
    # a CPU to run on and the workers would wait forever (seen with 2 workers on 2 cores). Row order must be
    # the cache's order (the training order is derived from it), so the read preserves block order.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets = {split: ray.data.read_parquet(str(cache / split)).materialize() for split in ("train", "eval")}
    return datasets, stats
