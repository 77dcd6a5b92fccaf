"""The real Anthropic HH-RLHF harmless-base test split, read in place from ../shared (never copied)."""

from pathlib import Path

import pytest

from orpo_ray.data import read_pairs
from orpo_ray.tokenize import tokenize_pair
from orpo_ray.tokenizer import build_byte_tokenizer

HH = Path(__file__).resolve().parents[2].parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def hh():
    if not HH.exists():
        pytest.skip(f"{HH} not present")
    return read_pairs(HH)


def test_every_row_is_a_pair_or_quarantined_with_a_reason(hh):
    pairs, quarantined = hh
    assert len(pairs) + len(quarantined) == 2312
    assert len({p.row for p in pairs} | {q.row for q in quarantined}) == 2312
    assert all(q.reason and q.source == str(HH) for q in quarantined)
    # Observed on this split: 5 rows whose transcripts diverge before the last Assistant turn,
    # 4 whose chosen reply is empty. Both would make a pair without a shared prompt or with 0/0 logps.
    assert sorted({q.reason for q in quarantined}) == ["chosen and rejected do not share a prompt",
                                                        "empty chosen response"]


def test_hh_prompts_end_with_the_assistant_turn_and_truncate_safely(hh):
    pairs, _ = hh
    tok = build_byte_tokenizer()
    for pair in pairs[:200]:
        assert pair.prompt.endswith("\n\nAssistant:")
        row = tokenize_pair(pair.prompt, pair.chosen, pair.rejected, tok, max_length=256, max_prompt_length=128)
        assert len(row["chosen_ids"]) >= 1 and len(row["rejected_ids"]) >= 1
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 256
