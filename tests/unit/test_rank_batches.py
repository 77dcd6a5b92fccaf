"""Rank-count-independent training order of the Ray path (ray_data.rank_micro_batches)."""

import numpy as np
import pytest

from orpo_ray.data.ray_pipeline import micro_batches_per_epoch, rank_micro_batches, window_rows


def batches(n, per_device, world, rank, accum=1, epoch=0, seed=42):
    ids = np.arange(n)
    size = window_rows(per_device, world, accum)
    windows = ({"id": ids[i:i + size]} for i in range(0, n, size))  # what iter_batches(batch_size=size) yields
    return [b["id"].tolist() for b in rank_micro_batches(windows, per_device=per_device, world_size=world, rank=rank,
                                                         grad_accum=accum, seed=seed, epoch=epoch)]


@pytest.mark.parametrize("n", [300, 128, 17])
def test_global_micro_batches_do_not_depend_on_world_size(n):
    one = batches(n, 8, 1, 0)
    two = [batches(n, 4, 2, r) for r in range(2)]
    four = [batches(n, 2, 4, r) for r in range(4)]
    assert len(one) == micro_batches_per_epoch(n, 8, 1, 1) == len(two[0]) == len(four[3]) == n // 8
    for i, global_batch in enumerate(one):
        assert two[0][i] + two[1][i] == global_batch
        assert sum((four[r][i] for r in range(4)), []) == global_batch
    used = sum(one, [])
    assert len(set(used)) == len(used)  # no pair twice in an epoch


def test_epochs_reshuffle_and_the_last_window_keeps_whole_steps():
    assert batches(300, 4, 2, 0, epoch=0) != batches(300, 4, 2, 0, epoch=1)
    assert batches(300, 4, 2, 0, epoch=1) == batches(300, 4, 2, 0, epoch=1)  # deterministic
    # 300 rows, 3 micro-batches of 8 per step: 12 steps = 36 micro-batches, not floor(300 / 8) = 37.
    assert len(batches(300, 4, 2, 1, accum=3)) == micro_batches_per_epoch(300, 4, 2, 3) == 36
