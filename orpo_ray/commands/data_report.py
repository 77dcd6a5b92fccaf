"""`orpo-ray data-report CONFIG`: what is in the preference data, before any compute is spent on it.

Reads through the same path as training (prepare.prepare_data: same formats, quarantine, truncation and
data policy) and reports: rows per format, quarantined rows by reason with examples,
token-length percentiles, what the truncation policy cuts, pairs that carry no ORPO signal (chosen and
rejected identical or nearly so after tokenization), duplicate prompts, and how much of a padded batch
would be padding. Writes data_report.json and a length histogram PNG to output_dir.

Pure module (matplotlib for the PNG); no ray, no deepspeed.
"""

from __future__ import annotations

import difflib
import json
import random
from collections import Counter
from pathlib import Path

from orpo_ray.config import Config
from orpo_ray.data.policy import identical_responses
from orpo_ray.data.prepare import prepare_data
from orpo_ray.data.records import closest_format, detect_format, iter_records
from orpo_ray.data.tokenize import render_pair
from orpo_ray.tokenizer import load_tokenizer

NEAR_IDENTICAL_RATIO = 0.95  # difflib similarity of token ids at or above which a pair is "nearly identical"
EXAMPLES_PER_REASON = 3


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def row_formats(files: list[str], configured: str, on_damaged: str) -> dict[tuple[str, int], str]:
    """(source, row) -> the format the row is read as: the configured one, or the row's own (closest) shape."""
    out = {}
    for f in dict.fromkeys(files):  # train and eval may be the same file
        for row, record in iter_records(f, on_damaged):
            if configured != "auto":
                fmt = configured
            elif isinstance(record, dict):
                try:
                    fmt = detect_format(record)
                except ValueError:
                    fmt = closest_format(record) or "unknown"
            else:
                fmt = "unknown"
            out[(f, row)] = fmt
    return out


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


def nearly_identical(row: dict, threshold: float = NEAR_IDENTICAL_RATIO) -> bool:
    """Chosen and rejected ids differ but are at least `threshold` similar (difflib ratio): almost no signal."""
    if identical_responses(row):
        return False
    matcher = difflib.SequenceMatcher(None, list(row["chosen_ids"]), list(row["rejected_ids"]), autojunk=False)
    # quick_ratio is an upper bound of ratio and costs O(n): most pairs are settled without the O(n*m) match.
    return matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold


def rows_by_format(formats: dict[tuple[str, int], str], pairs: list, quarantined: list) -> dict:
    """{format: {"pairs": n, "quarantined": m}}, each row counted under its own format."""
    counts: dict[str, Counter] = {}
    for kind, items in (("pairs", pairs), ("quarantined", quarantined)):
        for item in items:
            counts.setdefault(formats.get((item.source, item.row), "unknown"), Counter())[kind] += 1
    return {fmt: dict(c) for fmt, c in counts.items()}


def build_report(cfg: Config, tokenizer) -> dict:
    d = cfg.data
    prepared = prepare_data(cfg, tokenizer)
    quarantined, sources, train_rows, rows = (prepared.quarantined, prepared.sources, prepared.train_rows,
                                              prepared.train_rows + prepared.eval_rows)
    pair_of = lambda r: prepared.pairs[(r["source"], r["row"])]  # noqa: E731
    train_pairs, eval_pairs = list(map(pair_of, train_rows)), list(map(pair_of, prepared.eval_rows))
    pairs = train_pairs + eval_pairs
    # Untruncated lengths (no BOS/EOS), to show what max_length would cut.
    raw = [render_pair(p, tokenizer) for p in pairs]
    raw_lengths = {k: [len(ids) for ids in tokenizer([r[i] for r in raw], add_special_tokens=False)["input_ids"]]
                   if raw else [] for i, k in enumerate(("prompt", "chosen", "rejected"))}

    by_reason: dict[str, list] = {}
    for q in quarantined:
        by_reason.setdefault(q.reason, []).append({"source": q.source, "row": q.row, "excerpt": q.excerpt})
    identical = prepared.stats["identical_pairs"]  # counted before data.drop_identical_pairs
    near = sum(map(nearly_identical, rows))
    key = lambda p: p.prompt if isinstance(p.prompt, str) else json.dumps(p.prompt)  # noqa: E731
    train_prompts, eval_prompts = Counter(map(key, train_pairs)), Counter(map(key, eval_pairs))
    repeats = lambda counts: sum(c - 1 for c in counts.values())  # noqa: E731
    cut = [r for r in rows if r["prompt_tokens_cut"] or r["response_tokens_cut"]]
    files = [sources.train_path] + ([sources.eval_path] if sources.eval_path else [])
    return {
        "sources": files,
        "rows_by_format": rows_by_format(row_formats(files, d.format, d.on_damaged_file), pairs, quarantined),
        "pairs": {"train": len(train_pairs), "eval": len(eval_pairs)},
        "quarantined": {"total": len(quarantined),
                        "by_reason": {k: {"count": len(v), "examples": v[:EXAMPLES_PER_REASON]}
                                      for k, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))}},
        "tokens_untruncated": {k: percentiles(v) for k, v in raw_lengths.items()},
        "truncation": {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                       "pairs_cut": len(cut), "share_cut": round(len(cut) / len(rows), 4) if rows else 0.0,
                       "prompt_tokens_cut": sum(r["prompt_tokens_cut"] for r in rows),
                       "response_tokens_cut": sum(r["response_tokens_cut"] for r in rows),
                       # per cut pair: prompt + chosen + rejected tokens removed
                       "tokens_cut_per_cut_pair": percentiles(
                           [r["prompt_tokens_cut"] + r["response_tokens_cut"] for r in cut])},
        "no_signal_pairs": {"identical": identical, "nearly_identical": near,
                            "near_ratio_threshold": NEAR_IDENTICAL_RATIO,
                            "dropped_in_training": d.drop_identical_pairs},
        # Repeated prompts (pairs beyond the first with that prompt), and eval prompts also seen in training.
        "duplicate_prompts": {"train": repeats(train_prompts), "eval": repeats(eval_prompts),
                              "eval_pairs_with_a_train_prompt": sum(c for k, c in eval_prompts.items()
                                                                    if k in train_prompts)},
        # Training batches are shuffled, so the waste is measured on train rows in a seeded random order.
        "padding_waste": {"pairs_per_batch": cfg.train.per_device_batch_size, "rows": "train, shuffled",
                          "share_of_tokens": round(padding_waste(
                              random.Random(cfg.train.seed).sample(train_rows, len(train_rows)),
                              cfg.train.per_device_batch_size), 4)},
        "tokenizer": {"source": cfg.model.tokenizer or ("byte-level (orpo_ray.embedded_tokenizer)" if cfg.model.name_or_path
                                                        == "tiny" else cfg.model.name_or_path),
                      "type": type(tokenizer).__name__, "vocab": len(tokenizer)},
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


def summary_lines(report: dict) -> list[str]:
    """The headline numbers, one line each, for the terminal."""
    t, ns, q = report["truncation"], report["no_signal_pairs"], report["quarantined"]
    fmt = lambda p: "/".join(str(p.get(k, "-")) for k in ("p50", "p90", "p99", "max"))  # noqa: E731
    lines = [
        "sources: " + ", ".join(report["sources"]),
        "rows by format: " + ", ".join(f"{k} {v.get('pairs', 0)} pairs + {v.get('quarantined', 0)} quarantined"
                                       for k, v in report["rows_by_format"].items()),
        f"pairs: train {report['pairs']['train']}, eval {report['pairs']['eval']}; quarantined {q['total']}",
        *(f"  quarantined: {v['count']} x {reason} (e.g. row {v['examples'][0]['row']})"
          for reason, v in q["by_reason"].items()),
        "tokens p50/p90/p99/max (untruncated): " + "; ".join(
            f"{k} {fmt(v)}" for k, v in report["tokens_untruncated"].items()),
        f"truncation at max_length {t['max_length']} / max_prompt_length {t['max_prompt_length']}: "
        f"{t['pairs_cut']} pairs cut ({t['share_cut']:.1%}); {t['prompt_tokens_cut']} prompt + "
        f"{t['response_tokens_cut']} response tokens removed; per cut pair {fmt(t['tokens_cut_per_cut_pair'])}",
        f"no-signal pairs: {ns['identical']} identical, {ns['nearly_identical']} nearly identical "
        f"(token similarity >= {ns['near_ratio_threshold']})",
        "duplicate prompts: {train} repeats in train, {eval} in eval; {eval_pairs_with_a_train_prompt} eval pairs "
        "have a training prompt".format(**report["duplicate_prompts"]),
        f"padding waste at {report['padding_waste']['pairs_per_batch']} pairs/batch: "
        f"{report['padding_waste']['share_of_tokens']:.1%} of token slots",
        f"tokenizer: {report['tokenizer']['source']} (vocab {report['tokenizer']['vocab']})",
    ]
    if ns["identical"]:
        lines.append(f"warning: {ns['identical']} pairs have identical chosen and rejected tokens (no ORPO signal); "
                     + ("data.drop_identical_pairs=true drops them in training" if ns["dropped_in_training"]
                        else "set data.drop_identical_pairs=true to drop them"))
    if ns["nearly_identical"]:
        lines.append(f"warning: {ns['nearly_identical']} pairs are nearly identical after tokenization (little signal)")
    return lines


def run_data_report(cfg: Config) -> dict:
    """Build the report, write data_report.json + data_lengths.png to output_dir (and MLflow), print it."""
    tokenizer = load_tokenizer(cfg.model)
    report = build_report(cfg, tokenizer)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_lengths(report.pop("_raw_lengths"), cfg.data.max_length, out / "data_lengths.png")
    (out / "data_report.json").write_text(json.dumps(report, indent=2))
    if cfg.tracking.enabled:
        from orpo_ray.tracking import make_tracker

        with make_tracker(cfg) as tracker:
            tracker.start(cfg.tracking.experiment, run_name=f"data-report-{out.name}")
            tracker.log_artifact(out / "data_report.json")
            tracker.log_artifact(out / "data_lengths.png")
    print("\n".join(summary_lines(report)))
    print(f"written: {out / 'data_report.json'}, {out / 'data_lengths.png'}")
    return report
