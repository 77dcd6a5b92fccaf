"""The truncation policy by hand-checked ids, chat rendering, and the padded batch layout."""

import numpy as np
import pytest
import torch

from orpo_ray.collate import collate_pairs
from orpo_ray.data import PreferencePair
from orpo_ray.synthetic import generate_pairs, write_synthetic_split
from orpo_ray.tokenize import render_pair, tokenize_pair
from orpo_ray.tokenizer import build_byte_tokenizer

TOK = build_byte_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def ids(text):
    return TOK.encode(text, add_special_tokens=False)


def test_short_pair_is_untouched():
    row = tokenize_pair("ab", "c", "de", TOK, max_length=16, max_prompt_length=8)
    assert row["prompt_ids"] == [BOS] + ids("ab")
    assert row["chosen_ids"] == ids("c") + [EOS] and row["rejected_ids"] == ids("de") + [EOS]
    assert row["prompt_tokens_cut"] == row["response_tokens_cut"] == 0


def test_long_prompt_keeps_its_end_and_bos_first():
    # prompt = BOS + 10 bytes; budget 5 keeps BOS + the last 4 bytes "ghij"
    row = tokenize_pair("abcdefghij", "x", "y", TOK, max_length=8, max_prompt_length=5)
    assert row["prompt_ids"] == [BOS] + ids("ghij")
    assert row["prompt_tokens_cut"] == 6
    assert row["chosen_ids"] == ids("x") + [EOS]


def test_responses_are_right_truncated_to_the_remaining_budget():
    # prompt BOS+"ab" = 3 tokens; max_length 6 leaves 3 response tokens: "123" (EOS and "45" cut)
    row = tokenize_pair("ab", "12345", "z", TOK, max_length=6, max_prompt_length=4)
    assert row["chosen_ids"] == ids("123")
    assert row["rejected_ids"] == ids("z") + [EOS]
    assert row["response_tokens_cut"] == 3


def test_a_prompt_filling_max_length_still_leaves_a_response_token():
    row = tokenize_pair("x" * 500, "answer", "other", TOK, max_length=64, max_prompt_length=63)
    assert len(row["prompt_ids"]) == 63 and len(row["chosen_ids"]) == 1 and len(row["rejected_ids"]) == 1
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) <= 64


def test_prompt_budget_must_be_below_max_length():
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pair("a", "b", "c", TOK, max_length=4, max_prompt_length=4)


def test_render_conversational_pair_with_chat_template():
    pair = PreferencePair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}],
                          [{"role": "assistant", "content": "go"}], "f", 1)
    prompt, chosen, rejected = render_pair(pair, TOK)
    assert prompt == "\n\nHuman: hi\n\nAssistant:"
    assert (chosen, rejected) == (" hello", " go")


def test_collate_layout_by_hand():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, EOS], "rejected_ids": [4, 5, EOS]},
            {"prompt_ids": [6], "chosen_ids": [7, EOS], "rejected_ids": [EOS]}]
    b = collate_pairs(rows, PAD)
    assert b["num_pairs"] == 2 and b["input_ids"].shape == (4, 5)
    assert b["input_ids"].tolist() == [[1, 2, 3, EOS, PAD], [6, 7, EOS, PAD, PAD],
                                       [1, 2, 4, 5, EOS], [6, EOS, PAD, PAD, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["response_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_collate_accepts_ray_data_numpy_columns():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, EOS], "rejected_ids": [4, EOS]}]
    columns = {k: np.array([np.array(r[k], dtype=np.int64) for r in rows] + [np.array([9])], dtype=object)[:1]
               for k in rows[0]}
    assert torch.equal(collate_pairs(columns, PAD)["input_ids"], collate_pairs(rows, PAD)["input_ids"])


def test_synthetic_task_is_deterministic_disjoint_and_sorted(tmp_path):
    assert generate_pairs("sort", 20, seed=1) == generate_pairs("sort", 20, seed=1)
    assert generate_pairs("sort", 20, seed=1) != generate_pairs("sort", 20, seed=2)
    train, evals = write_synthetic_split(tmp_path, "sort", 200, 50, seed=0)
    import json
    load = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    train_rows, eval_rows = load(train), load(evals)
    assert len(train_rows) == 200 and len(eval_rows) == 50
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    for r in train_rows:
        assert r["chosen"].strip() == "".join(sorted(r["chosen"].strip())) and r["rejected"] != r["chosen"]
