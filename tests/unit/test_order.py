"""The one training order (data/order.py) that both runtimes use: the in-memory path (LocalRuntime, `rank_positions`)
and the streaming path (RayRuntime, `rank_micro_batches` over `iter_batches(window_rows)` windows)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo_ray.data.order import SHUFFLE_WINDOW_STEPS, TrainingOrder


def streamed(order: TrainingOrder, n: int, epoch: int, rank: int) -> list[list[int]]:
    """What RayRuntime yields: the cache streamed in windows of window_rows rows (iter_batches' cut)."""
    ids = np.arange(n)
    windows = ({"id": ids[i:i + order.window_rows]} for i in range(0, n, order.window_rows))
    return [b["id"].tolist() for b in order.rank_micro_batches(windows, epoch, rank)]


def in_memory(order: TrainingOrder, n: int, epoch: int, rank: int) -> list[list[int]]:
    """What LocalRuntime yields (as positions into its rows)."""
    return [p.tolist() for p in order.rank_positions(n, epoch, rank)]


shapes = st.fixed_dictionaries({
    "n": st.integers(0, 300), "per_device": st.integers(1, 6), "world": st.integers(1, 4),
    "accum": st.integers(1, 3), "seed": st.integers(0, 2**31), "epoch": st.integers(0, 5)})


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_streaming_and_in_memory_paths_give_the_same_batches(s):
    order = TrainingOrder(s["per_device"], s["world"], s["accum"], s["seed"])
    for rank in range(s["world"]):
        assert streamed(order, s["n"], s["epoch"], rank) == in_memory(order, s["n"], s["epoch"], rank)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_global_batches_do_not_depend_on_world_size(s):
    """W ranks x b pairs see the same global micro-batches as 1 rank x W*b, rank r holding the r-th slice."""
    world, b = s["world"], s["per_device"]
    split = TrainingOrder(b, world, s["accum"], s["seed"])
    whole = TrainingOrder(b * world, 1, s["accum"], s["seed"])
    one = in_memory(whole, s["n"], s["epoch"], 0)
    ranks = [in_memory(split, s["n"], s["epoch"], r) for r in range(world)]
    assert all(len(r) == len(one) for r in ranks)
    for i, global_batch in enumerate(one):
        assert sum((ranks[r][i] for r in range(world)), []) == global_batch


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_an_epoch_is_whole_optimizer_steps_of_distinct_pairs(s):
    order = TrainingOrder(s["per_device"], s["world"], s["accum"], s["seed"])
    ranks = [in_memory(order, s["n"], s["epoch"], r) for r in range(s["world"])]
    per_epoch = order.micro_batches_per_epoch(s["n"])
    assert per_epoch % s["accum"] == 0
    assert all(len(batches) == per_epoch for batches in ranks)
    assert all(len(batch) == s["per_device"] for batches in ranks for batch in batches)
    used = [i for batches in ranks for batch in batches for i in batch]
    assert len(set(used)) == len(used) and all(0 <= i < s["n"] for i in used)
    assert s["n"] - len(used) == s["n"] % order.step_rows  # only the last partial step is left out


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_pairs_move_only_within_their_shuffle_window(s):
    """A local shuffle: a streaming reader holds one window, so batch k never reaches past its window."""
    order = TrainingOrder(s["per_device"], s["world"], s["accum"], s["seed"])
    per_window = SHUFFLE_WINDOW_STEPS * s["accum"]  # global micro-batches per full window
    for rank in range(s["world"]):
        for k, batch in enumerate(in_memory(order, s["n"], s["epoch"], rank)):
            assert {i // order.window_rows for i in batch} == {k // per_window}


def test_hand_worked_order():
    """2 ranks x 1 pair: a window is 16 steps x 2 = 32 rows, permuted by (seed, epoch, window); rank r takes
    every other pair."""
    order = TrainingOrder(per_device=1, world_size=2, grad_accum=1, seed=7)
    perm = np.random.default_rng([7, 3, 0]).permutation(12).tolist()
    assert in_memory(order, 12, 3, 0) == [[perm[0]], [perm[2]], [perm[4]], [perm[6]], [perm[8]], [perm[10]]]
    assert in_memory(order, 12, 3, 1) == [[perm[1]], [perm[3]], [perm[5]], [perm[7]], [perm[9]], [perm[11]]]
    assert order.window_rows == 32 and order.micro_batches_per_epoch(13) == 6
    # 40 rows: window 0 is rows 0..31 permuted by (7, 3, 0), window 1 rows 32..39 permuted by (7, 3, 1).
    first, second = (np.random.default_rng([7, 3, w]).permutation(n).tolist() for w, n in ((0, 32), (1, 8)))
    assert in_memory(order, 40, 3, 1) == [[i] for i in first[1::2] + [32 + j for j in second[1::2]]]


def test_epochs_reshuffle_deterministically():
    order = TrainingOrder(4, 2, 1, seed=42)
    assert in_memory(order, 300, 0, 0) != in_memory(order, 300, 1, 0)
    assert in_memory(order, 300, 1, 0) == in_memory(order, 300, 1, 0)
    assert in_memory(TrainingOrder(4, 2, 1, seed=43), 300, 1, 0) != in_memory(order, 300, 1, 0)


@pytest.mark.parametrize("n, accum, expected", [(300, 3, 36), (300, 1, 37), (23, 3, 0)])
def test_micro_batches_per_epoch_counts_whole_steps(n, accum, expected):
    # 4 x 2 = 8 pairs per micro-batch: 300 rows hold 12 steps of 3 micro-batches (36), not floor(300 / 8) = 37.
    order = TrainingOrder(4, 2, accum, seed=0)
    assert order.micro_batches_per_epoch(n) == expected == len(in_memory(order, n, 0, 1))
