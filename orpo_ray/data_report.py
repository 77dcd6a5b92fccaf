"""`orpo-ray data-report CONFIG`: what is in the preference data, before any compute is spent on it.

Reads through the same path as training (prepare.read_split_pairs -> tokenize_pairs: same formats,
quarantine and truncation policy) and reports: rows per format, quarantined rows by reason with examples,
token-length percentiles, what the truncation policy cuts, pairs that carry no ORPO signal (chosen and
rejected identical or nearly so after tokenization), duplicate prompts, and how much of a padded batch
would be padding. Writes data_report.json and a length histogram PNG to output_dir.

Pure module (matplotlib for the PNG); no ray, no deepspeed.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path

from orpo_ray.config import Config
from orpo_ray.data import detect_format, iter_records
from orpo_ray.modeling import load_tokenizer
from orpo_ray.prepare import identical_responses, read_split_pairs, tokenize_pairs
from orpo_ray.tokenize import render_pair

NEAR_IDENTICAL_RATIO = 0.95  # difflib similarity of token ids at or above which a pair is "nearly identical"
EXAMPLES_PER_REASON = 3


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def file_format(path: str, configured: str) -> str:
    """The format a file is read as: the configured one, or what its first well-formed record shows."""
    if configured != "auto":
        return configured
    for _, record in iter_records(path):
        if isinstance(record, dict):
            try:
                return detect_format(record)
            except ValueError:
                continue
    return "unknown"


def padding_waste(rows: list[dict], pairs_per_batch: int) -> float:
    """Share of token slots that are padding when batches of `pairs_per_batch` pairs are padded to their
    longest sequence (chosen and rejected rows padded together, as collate_pairs does)."""
    real = padded = 0
    for i in range(0, len(rows), pairs_per_batch):
        batch = rows[i:i + pairs_per_batch]
        lengths = [len(r["prompt_ids"]) + len(r[k]) for r in batch for k in ("chosen_ids", "rejected_ids")]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded if padded else 0.0


def rows_by_format(files: list[str], configured: str, pairs: list, quarantined: list) -> dict:
    """{format: {"pairs": n, "quarantined": m}} over the input files."""
    counts: dict[str, Counter] = {}
    for f in dict.fromkeys(files):  # train and eval may be the same file
        fmt = file_format(f, configured)
        c = counts.setdefault(fmt, Counter())
        c["pairs"] += sum(p.source == f for p in pairs)
        c["quarantined"] += sum(q.source == f for q in quarantined)
    return {fmt: dict(c) for fmt, c in counts.items()}


def build_report(cfg: Config, tokenizer) -> dict:
    d = cfg.data
    train_pairs, eval_pairs, quarantined, sources = read_split_pairs(cfg)
    pairs = train_pairs + eval_pairs
    rows = tokenize_pairs(pairs, tokenizer, d.max_length, d.max_prompt_length)
    # Untruncated lengths, to show what max_length would cut.
    raw = [render_pair(p, tokenizer) for p in pairs]
    encode = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    raw_lengths = {k: [encode(r[i]) for r in raw] for i, k in enumerate(("prompt", "chosen", "rejected"))}

    by_reason: dict[str, list] = {}
    for q in quarantined:
        by_reason.setdefault(q.reason, []).append({"source": q.source, "row": q.row, "excerpt": q.excerpt})
    identical = sum(identical_responses(r) for r in rows)
    near = sum(1 for r in rows if not identical_responses(r) and difflib.SequenceMatcher(
        None, list(r["chosen_ids"]), list(r["rejected_ids"]), autojunk=False).ratio() >= NEAR_IDENTICAL_RATIO)
    prompts = Counter(p.prompt if isinstance(p.prompt, str) else json.dumps(p.prompt) for p in pairs)
    cut = [r for r in rows if r["prompt_tokens_cut"] or r["response_tokens_cut"]]
    files = [sources.train_path] + ([sources.eval_path] if sources.eval_path else [])
    return {
        "sources": files,
        "rows_by_format": rows_by_format(files, d.format, pairs, quarantined),
        "pairs": {"train": len(train_pairs), "eval": len(eval_pairs)},
        "quarantined": {"total": len(quarantined),
                        "by_reason": {k: {"count": len(v), "examples": v[:EXAMPLES_PER_REASON]}
                                      for k, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))}},
        "tokens_untruncated": {k: percentiles(v) for k, v in raw_lengths.items()},
        "truncation": {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                       "pairs_cut": len(cut), "share_cut": round(len(cut) / len(rows), 4) if rows else 0.0,
                       "prompt_tokens_cut": sum(r["prompt_tokens_cut"] for r in rows),
                       "response_tokens_cut": sum(r["response_tokens_cut"] for r in rows)},
        "no_signal_pairs": {"identical": identical, "nearly_identical": near,
                            "near_ratio_threshold": NEAR_IDENTICAL_RATIO,
                            "dropped_in_training": d.drop_identical_pairs},
        "duplicate_prompts": sum(c - 1 for c in prompts.values() if c > 1),
        "padding_waste": {"pairs_per_batch": cfg.train.per_device_batch_size,
                          "share_of_tokens": round(padding_waste(rows, cfg.train.per_device_batch_size), 4)},
        "tokenizer": {"type": type(tokenizer).__name__, "vocab": len(tokenizer)},
        "_raw_lengths": raw_lengths,
    }


def plot_lengths(raw_lengths: dict, max_length: int, out_path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, values in raw_lengths.items():
        ax.hist(values, bins=50, alpha=0.5, label=name)
    ax.axvline(max_length, color="black", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens (before truncation)")
    ax.set_ylabel("pairs")
    ax.set_title("Prompt and response lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, format="png")
    return out_path


def run_data_report(cfg: Config) -> dict:
    tokenizer = load_tokenizer(cfg.model)
    report = build_report(cfg, tokenizer)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_lengths(report.pop("_raw_lengths"), cfg.data.max_length, out / "data_lengths.png")
    (out / "data_report.json").write_text(json.dumps(report, indent=2))
    if cfg.tracking.enabled:
        from orpo_ray.tracking import Tracker, resolve_tracking_uri

        with Tracker(resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir)) as tracker:
            tracker.start(cfg.tracking.experiment, run_name=f"data-report-{out.name}")
            tracker.log_artifact(out / "data_report.json")
            tracker.log_artifact(out / "data_lengths.png")
    print(json.dumps({k: report[k] for k in ("pairs", "truncation", "no_signal_pairs", "duplicate_prompts",
                                             "padding_waste")} | {"quarantined": report["quarantined"]["total"]},
                     indent=2))
    if report["no_signal_pairs"]["identical"]:
        print(f"warning: {report['no_signal_pairs']['identical']} pairs have identical chosen and rejected tokens "
              "(no ORPO signal); set data.drop_identical_pairs=true to drop them")
    return report
