"""orpo_ray.forward.collate: the padded batch of docs/architecture.md, checked cell by cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orpo_ray.forward.collate import collate_pairs

PAD, EOS = 0, 9
ROWS = [{"prompt_ids": [1, 2], "chosen_ids": [3, EOS], "rejected_ids": [4, 5, EOS]},
        {"prompt_ids": [6], "chosen_ids": [7, EOS], "rejected_ids": [EOS]}]


def ray_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Ray Data's numpy batch: one object array of int64 arrays per column."""
    columns = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [np.asarray(r[key], dtype=np.int64) for r in rows]
        columns[key] = column
    return columns


def test_layout_by_hand():
    b = collate_pairs(ROWS, PAD)
    assert b["num_pairs"] == 2
    # chosen rows first (prompt + chosen), then rejected rows; right-padded to the longest (5)
    assert b["input_ids"].tolist() == [[1, 2, 3, EOS, PAD],
                                       [6, 7, EOS, PAD, PAD],
                                       [1, 2, 4, 5, EOS],
                                       [6, EOS, PAD, PAD, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["response_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert (b["input_ids"].dtype, b["attention_mask"].dtype, b["response_mask"].dtype) == (
        torch.long, torch.long, torch.bool)


def test_pad_to_multiple_of_rounds_the_width_up():
    b = collate_pairs(ROWS, PAD, pad_to_multiple_of=4)
    assert b["input_ids"].shape == (4, 8)
    assert b["input_ids"][:, 5:].eq(PAD).all() and not b["attention_mask"][:, 5:].any()
    assert not b["response_mask"][:, 5:].any()


def test_ray_numpy_columns_give_the_same_batch():
    expected = collate_pairs(ROWS, PAD)
    for batch in (ray_columns(ROWS),
                  # equal-length rows may arrive as one 2-D int array per column
                  {k: np.array([r[k] for r in ROWS[:1]] * 2) for k in ROWS[0]}):
        got = collate_pairs(batch, PAD)
        reference = expected if batch["prompt_ids"].dtype == object else collate_pairs([ROWS[0]] * 2, PAD)
        for key in ("input_ids", "attention_mask", "response_mask"):
            assert torch.equal(got[key], reference[key]), key


@pytest.mark.parametrize("rows, message", [
    ([], "empty batch"),
    ([{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [EOS]}], ">= 1 chosen"),
])
def test_invalid_batches_are_refused(rows, message):
    with pytest.raises(ValueError, match=message):
        collate_pairs(rows, PAD)


def test_a_missing_pad_token_is_refused():
    with pytest.raises(ValueError, match="pad_token_id"):
        collate_pairs(ROWS, None)
