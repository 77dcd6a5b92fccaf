"""The real Anthropic HH-RLHF harmless-base test split, read in place from ../shared (never copied).

Reading all 2,312 rows takes ~0.05 s, so this stays a unit test.
"""

import gzip
import json
from pathlib import Path

import pytest

from orpo_ray.data.records import detect_format, read_pairs
from orpo_ray.data.tokenize import tokenize_pair
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

HH = Path(__file__).resolve().parents[2].parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def hh():
    if not HH.exists():
        pytest.skip(f"{HH} not present")
    return read_pairs(HH)


def test_every_row_is_a_pair_or_quarantined_with_a_reason(hh):
    pairs, quarantined = hh
    assert detect_format(json.loads(gzip.open(HH).readline())) == "hh"
    assert len(pairs) + len(quarantined) == 2312
    assert sorted([p.row for p in pairs] + [q.row for q in quarantined]) == list(range(1, 2313))
    assert all(q.reason and q.excerpt and q.source == str(HH) for q in quarantined)
    # Observed on this split: 5 transcripts whose turns diverge before the last "Assistant:" (multi-turn
    # responses) and 4 whose chosen reply is empty - neither can be a pair with one shared prompt and two
    # real responses (the empty one would make a 0/0 mean log-prob).
    reasons = [q.reason for q in quarantined]
    assert (len(pairs), reasons.count("chosen and rejected do not share a prompt"),
            reasons.count("empty chosen response"), len(reasons)) == (2303, 5, 4, 9)


def test_hh_prompts_end_with_the_assistant_turn_and_truncate_safely(hh):
    pairs, _ = hh
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen.strip() and p.rejected.strip() for p in pairs)
    tok = build_byte_tokenizer()
    for pair in pairs[:200]:
        row = tokenize_pair(pair.prompt, pair.chosen, pair.rejected, tok, max_length=256, max_prompt_length=128)
        assert len(row["chosen_ids"]) >= 1 and len(row["rejected_ids"]) >= 1
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 256
