"""The Ray Data pipeline: preference files -> parsed rows | quarantine -> tokenized Parquet cache.

Parsing and tokenizing run as Ray Data tasks (`flat_map` per input file, `map_batches` per block) using
the same pure functions as the in-process path (`records.read_pairs`, `tokenize.tokenize_batch`), and the
data policy (limits, identical pairs, stats) is `policy.select_split` on the driver, as in-process, so both
paths share one quarantine policy, one truncation policy and one data policy. Files are parsed by our own reader rather
than `ray.data.read_json` because a single malformed line makes `read_json` fail the whole dataset,
while we must quarantine it with its line number and go on.

The tokenized result is written once as Parquet under `data.cache_dir/<fingerprint>/` (inputs, their
size and mtime, tokenizer and truncation settings); later runs and every trial of a Tune sweep read the
cache with `ray.data.read_parquet` and stream it to workers.

The training order (which rows form each global micro-batch, and each rank's slice) is data/order.py's,
the same for this streaming path and the in-process one; it derives from the cache's row order, so the
cache stores each split sorted by (source, row), the order `prepare.prepare_data` returns. Each split's rows
come from one `parse_file` call (one input), so it sorts them there and every later step keeps block order
(`preserve_order`): a distributed `Dataset.sort` would cost a sample, map and reduce stage of fresh worker
processes (~25 s of a 90 s tiny run on 2 cores) to reorder rows that are already in order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orpo_ray.config import Config
from orpo_ray.data.policy import data_stats, require_train_pairs, select_split
from orpo_ray.data.prepare import fingerprint, pair_key, resolve_sources, split_for_eval
from orpo_ray.data.records import DamagedFileError, Quarantined, pair_to_row, read_pairs, write_quarantine
from orpo_ray.data.tokenize import FLAG_COLUMNS, QUARANTINE_COLUMNS, TOKEN_COLUMNS, tokenize_batch, use_chat_template
from orpo_ray.tokenizer import load_tokenizer


_PAIR_COLUMNS = ["prompt", "chosen", "rejected", "conversational", "source", "row"]


# A file that cannot be read at all: the row kind parse_file emits for it, and the error the driver raises.
UNREADABLE = {"damaged": DamagedFileError, "missing": FileNotFoundError}


def parse_file(item: dict, fmt: str, eval_fraction: float, max_chars: int, on_damaged: str) -> list[dict]:
    """One input file -> rows with a uniform schema: kind 'pair' (with split), 'quarantine', or one of UNREADABLE:
    'missing' (no such file) or 'damaged' (the file broke off and data.on_damaged_file is 'error'). For those the
    driver raises the error itself, naming the file, instead of Ray's pages-long wrapper of a failed task."""
    try:
        pairs, quarantined = read_pairs(item["path"], fmt, max_chars, on_damaged)
    except tuple(UNREADABLE.values()) as e:
        kind = next(kind for kind, error in UNREADABLE.items() if isinstance(e, error))
        return [{"kind": kind, "split": "", "prompt": "", "chosen": "", "rejected": "",
                 "conversational": False, "source": item["path"], "row": 0, "reason": str(e), "excerpt": ""}]
    if item["split"]:
        splits = [(item["split"], pairs)]
    else:
        train, evals = split_for_eval(pairs, eval_fraction)
        splits = [("train", train), ("eval", evals)]
    out = []
    for split, chunk in splits:
        for pair in sorted(chunk, key=pair_key):  # the cache's row order (module docstring)
            row = {k: "" for k in _PAIR_COLUMNS} | pair_to_row(pair)
            out.append({"kind": "pair", "split": split, "reason": "", "excerpt": "",
                        **{k: row[k] for k in _PAIR_COLUMNS}})
    for q in quarantined:
        out.append({"kind": "quarantine", "split": "", "prompt": "", "chosen": "", "rejected": "",
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
        parse_file, fn_kwargs={"fmt": d.format, "eval_fraction": d.eval_fraction, "max_chars": d.max_chars,
                               "on_damaged": d.on_damaged_file}).materialize()
    if unreadable := parsed.filter(lambda r: r["kind"] in UNREADABLE).take(1):
        raise UNREADABLE[unreadable[0]["kind"]](unreadable[0]["reason"])

    read_quarantine = [Quarantined(r["source"], int(r["row"]), r["reason"], r["excerpt"])
                       for r in parsed.filter(lambda r: r["kind"] == "quarantine").take_all()]
    tokenized = (parsed.filter(lambda r: r["kind"] == "pair")
                 .map_batches(tokenize_batch, batch_format="numpy", fn_kwargs={
                     "tokenizer": tokenizer, "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                     "keep": ("split", "source", "row")})
                 .materialize())
    # The policy (limits, identical pairs, counts) runs on the driver over small per-row outcomes, the same
    # function the in-process path calls; the token ids stay in the Ray dataset.
    columns = ["split", "source", "row", *FLAG_COLUMNS, *QUARANTINE_COLUMNS]
    outcomes = tokenized.select_columns(columns).take_all() if tokenized.count() else []
    key = lambda r: (str(r["source"]), int(r["row"]))  # noqa: E731
    outcome = lambda r: Quarantined(*key(r), r["reason"], r["excerpt"]) if r["reason"] else r  # noqa: E731
    selections = {split: select_split([r for r in outcomes if r["split"] == split], key, outcome, limit,
                                      d.drop_identical_pairs)
                  for split, limit in (("train", d.max_train_pairs), ("eval", d.max_eval_pairs))}
    quarantined = read_quarantine + selections["train"].quarantined + selections["eval"].quarantined
    require_train_pairs(selections["train"], quarantined, sources.train_path)
    stats = data_stats(selections["train"], selections["eval"], read_quarantine, len(outcomes)) | {
        "sources": [i["path"] for i in items]}

    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, selection in selections.items():
        keep = {key(r) for r in selection.kept}
        # Already sorted by (source, row) (parse_file) and kept so (preserve_order): the cache's row order, and so
        # the training order, is reproducible.
        part = tokenized.filter(lambda r, s=split, k=keep: r["split"] == s and key(r) in k)
        count = len(keep)
        if count == 0:  # Ray writes no file for an empty dataset; an empty split must still read back (0 rows)
            (tmp / split).mkdir(parents=True)
            pq.write_table(pa.table({k: pa.array([], pa.list_(pa.int64()) if k.endswith("_ids") else pa.int64())
                                     for k in TOKEN_COLUMNS}), tmp / split / "empty.parquet")
            continue
        part.select_columns(list(TOKEN_COLUMNS)).repartition(max(1, min(8, count // 2048 + 1))).write_parquet(
            str(tmp / split))
    write_quarantine(tmp / "quarantine.jsonl", quarantined)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)  # readers never see a half-written cache
    return stats


def tokenized_datasets(cfg: Config, tokenizer=None) -> tuple[dict, dict]:
    """{'train': Dataset, 'eval': Dataset} of tokenized rows, and data stats; tokenizes at most once."""
    import ray.data

    tokenizer = use_chat_template(tokenizer or load_tokenizer(cfg.model), cfg.data.chat_template)
    context = ray.data.DataContext.get_current()
    # Row order is the training order (data/order.py): every stage keeps its input's block order, while the
    # cache is built and when it is read.
    context.execution_options.preserve_order = True
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
    # a CPU to run on and the workers would wait forever (seen with 2 workers on 2 cores). Read with Ray Data's
    # V1 Parquet reader: the V2 one starts a pool of footer-reading actors (new worker processes) for every
    # read, 13.7 s against 2.3 s for this tiny run's two splits on 2 cores; both read tasks where the blocks go.
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        datasets = {split: ray.data.read_parquet(str(cache / split)).materialize() for split in ("train", "eval")}
    finally:
        context.use_datasource_v2 = use_v2
    return datasets, stats
