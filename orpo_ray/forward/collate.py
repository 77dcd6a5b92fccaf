"""Tokenized rows -> the padded batch of docs/architecture.md.

Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded to the longest sequence in the
batch (not to max_length). `response_mask` marks response tokens (EOS included); the prompt and padding
never enter the log-probability means.

Pure module: torch only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from orpo_ray.forward.matmul_shapes import round_up


def pair_rows(batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence]) -> list[tuple[list, list, list]]:
    """Accept a list of row dicts, or Ray Data's dict of columns (numpy object arrays of int arrays, or a 2-D
    int array when every row of a column happens to have the same length)."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    if isinstance(batch, Mapping):
        return [tuple(list(map(int, batch[k][i])) for k in keys) for i in range(len(batch["prompt_ids"]))]
    return [tuple(list(map(int, r[k])) for k in keys) for r in batch]


def collate_pairs(batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict:
    """Padded batch [2B, T]: chosen rows first, then rejected; T = longest sequence (rounded up if asked)."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer a pad token")
    rows = pair_rows(batch)
    if not rows:
        raise ValueError("cannot collate an empty batch")
    if any(not chosen or not rejected for _, chosen, rejected in rows):
        # An empty response would make its mean log-prob 0/0; tokenize_pair never produces one.
        raise ValueError("every tokenized row needs >= 1 chosen and >= 1 rejected token")
    if any(not prompt for prompt, _, _ in rows):
        # The first response token is scored from the position before it: without a prompt token (an empty
        # prompt and no BOS) the padded layout would silently skip it and the packed one index position -1.
        # tokenize_row quarantines such rows; this guards rows that did not come through it.
        raise ValueError("every tokenized row needs >= 1 prompt token (BOS counts)")
    sequences, response_lengths = [], []
    for responses in (1, 2):  # all chosen rows first, then all rejected rows
        for row in rows:
            sequences.append(row[0] + row[responses])
            response_lengths.append(len(row[responses]))
    longest = max(map(len, sequences))
    if pad_to_multiple_of:
        longest = round_up(longest, pad_to_multiple_of)
    n = len(sequences)
    input_ids = torch.full((n, longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    response_mask = torch.zeros((n, longest), dtype=torch.bool)
    for i, (seq, resp) in enumerate(zip(sequences, response_lengths)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
        response_mask[i, len(seq) - resp:len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "num_pairs": len(rows)}
