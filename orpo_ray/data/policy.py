"""The data policy, once: which parsed pairs a run trains and evaluates on, and the counts it reports.

Both data paths call this module - the in-process path (`prepare.prepare_data`) with rows it tokenizes on
demand, the Ray Data path (`ray_pipeline`) with the per-row outcomes its `map_batches` already computed -
so `--local` and a Ray run keep the same rows and report the same stats.

Per split, rows are visited in (source, row) order:
  1. once `limit` pairs (data.max_train_pairs / max_eval_pairs) are kept, every later row is dropped over the
     limit, unread by the tokenizer (in-process) or ignored (Ray);
  2. before that, a row whose tokenization failed is quarantined with its reason, any other row is kept;
  3. then, with data.drop_identical_pairs, kept pairs whose chosen and rejected tokenize identically are dropped
     (limits apply before the drop, so the pair count a limit gives does not depend on the drop).
Every row read is counted exactly once: rows_read == train_pairs + eval_pairs + quarantined
+ dropped_identical_pairs + dropped_over_limit.

Pure module: no ray, no deepspeed, no tokenizer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from orpo_ray.data.records import Quarantined


def identical_responses(row: Mapping[str, Any]) -> bool:
    """Chosen and rejected tokenize to the same ids: the pair carries no ORPO signal (odds ratio is 1)."""
    return list(row["chosen_ids"]) == list(row["rejected_ids"])


def truncated(row: Mapping[str, Any]) -> bool:
    return bool(row["prompt_tokens_cut"] or row["response_tokens_cut"])


def row_flags(tokens: Mapping[str, Any]) -> dict:
    """What the policy needs of a tokenized row; small enough for the Ray path to gather on the driver."""
    return {"identical": identical_responses(tokens), "truncated": truncated(tokens)}


def quarantine_reasons(quarantined: Iterable[Quarantined]) -> dict[str, int]:
    """{reason: rows}, most frequent first."""
    return dict(Counter(q.reason for q in quarantined).most_common())


@dataclass
class SplitSelection:
    """What the policy made of one split's rows: kept rows (in (source, row) order) and what was not kept."""

    kept: list = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    identical: int = 0          # kept pairs with identical responses, counted before any drop
    dropped_identical: int = 0
    over_limit: int = 0


def select_split(items: Iterable[Any], key: Callable[[Any], tuple], outcome: Callable[[Any], Any],
                 limit: Optional[int], drop_identical: bool) -> SplitSelection:
    """Apply the policy of the module docstring to one split.

    items: the split's parsed pairs (any objects); key(item) -> (source, row); outcome(item) -> a row with
    "identical" and "truncated" flags (see `row_flags`), or a `Quarantined`. `outcome` is called only for rows
    before the limit, so the in-process path never tokenizes a row it would drop.
    """
    out = SplitSelection()
    for item in sorted(items, key=key):
        if limit is not None and len(out.kept) >= limit:
            out.over_limit += 1
            continue
        result = outcome(item)
        if isinstance(result, Quarantined):
            out.quarantined.append(result)
        else:
            out.kept.append(result)
    out.identical = sum(bool(r["identical"]) for r in out.kept)
    if drop_identical and out.identical:
        out.kept = [r for r in out.kept if not r["identical"]]
        out.dropped_identical = out.identical
    return out


def data_stats(train: SplitSelection, evals: SplitSelection, read_quarantine: Sequence[Quarantined],
               pairs_read: int) -> dict:
    """The stats both paths report (train_loop prints them, results.json and MLflow keep them).

    rows_read is counted by the readers (pairs parsed + rows quarantined while reading), independently of the
    policy, so the identity in the module docstring is a check that the policy accounts for every pair.
    """
    quarantined = list(read_quarantine) + train.quarantined + evals.quarantined
    return {
        "rows_read": pairs_read + len(read_quarantine),
        "train_pairs": len(train.kept),
        "eval_pairs": len(evals.kept),
        "quarantined": len(quarantined),
        "quarantined_by_reason": quarantine_reasons(quarantined),
        "truncated_pairs": sum(bool(r["truncated"]) for r in train.kept + evals.kept),
        "identical_pairs": train.identical + evals.identical,
        "dropped_identical_pairs": train.dropped_identical + evals.dropped_identical,
        "dropped_over_limit": train.over_limit + evals.over_limit,
    }


def require_train_pairs(train: SplitSelection, quarantined: Sequence[Quarantined], train_path: str) -> None:
    """A run with no training pair cannot start: fail naming the file and the first reason."""
    if not train.kept:
        raise ValueError(f"{train_path}: no valid preference pairs ({len(quarantined)} rows quarantined; "
                         f"first reason: {quarantined[0].reason if quarantined else 'file is empty'})")
