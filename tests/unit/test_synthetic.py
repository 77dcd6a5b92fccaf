"""orpo_ray.data.synthetic: deterministic, near-miss rejections, train/eval disjoint, readable as 'pairs' data."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from orpo_ray.data.records import read_pairs
from orpo_ray.data.synthetic import DEFAULT_TASK, LETTERS, TASKS, Task, generate_pairs, write_synthetic_split


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_registry_has_the_default_task_and_rejects_unknown_names(tmp_path):
    assert DEFAULT_TASK == "sort" and DEFAULT_TASK in TASKS
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        generate_pairs("nope", 1, seed=0)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        write_synthetic_split(tmp_path, "nope", 1, 1, seed=0)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_pairs_other_seed_other_pairs(task):
    assert generate_pairs(task, 50, seed=3) == generate_pairs(task, 50, seed=3)
    assert generate_pairs(task, 50, seed=3) != generate_pairs(task, 50, seed=4)
    assert len({p["prompt"] for p in generate_pairs(task, 50, seed=3)}) == 50


def test_sort_pairs_are_sorted_answers_against_near_misses():
    for pair in generate_pairs("sort", 300, seed=0):
        letters = pair["prompt"].removeprefix("Sort: ").removesuffix("\nAnswer:")
        assert pair["prompt"] == f"Sort: {letters}\nAnswer:"
        assert pair["chosen"] == " " + "".join(sorted(letters))
        chosen, rejected = pair["chosen"], pair["rejected"]
        # same length, differs in one replaced letter or one adjacent swap: most tokens shared
        assert len(rejected) == len(chosen) and rejected != chosen
        differing = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        swapped = (len(differing) == 2 and differing[1] == differing[0] + 1
                   and sorted(rejected) == sorted(chosen))
        assert len(differing) == 1 or swapped, pair


def test_split_files_share_no_prompt_and_no_problem(tmp_path):
    train_path, eval_path = write_synthetic_split(tmp_path, "sort", 2000, 300, seed=0)
    train, evals = load(train_path), load(eval_path)
    assert (len(train), len(evals)) == (2000, 300)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in evals}
    # "Sort: dcba" in train and "Sort: abcd" in eval would be one problem seen twice
    assert not {p["chosen"] for p in train} & {p["chosen"] for p in evals}


def test_split_is_deterministic_and_written_once(tmp_path):
    first = write_synthetic_split(tmp_path / "a", "sort", 40, 10, seed=5)
    second = write_synthetic_split(tmp_path / "b", "sort", 40, 10, seed=5)
    assert [p.read_text() for p in first] == [p.read_text() for p in second]
    mtimes = [p.stat().st_mtime_ns for p in first]
    assert write_synthetic_split(tmp_path / "a", "sort", 40, 10, seed=5) == first
    assert [p.stat().st_mtime_ns for p in first] == mtimes


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_files_read_back_as_pairs_data(tmp_path, task):
    train_path, _ = write_synthetic_split(tmp_path, task, 30, 5, seed=1)
    pairs, quarantined = read_pairs(train_path)
    assert len(pairs) == 30 and quarantined == []


def test_too_small_a_task_space_fails_loudly():
    every_answer = {" " + "".join(c) for n in range(1, len(LETTERS) + 1) for c in combinations(LETTERS, n)}
    with pytest.raises(ValueError, match="cannot produce"):
        generate_pairs("sort", 10, seed=0, exclude_problems=every_answer)


def test_prompts_within_a_split_are_distinct_and_a_tiny_space_is_exhausted_loudly(monkeypatch):
    toy = Task(lambda rng: (rng.choice("abc"), " y", " n"))  # only three possible prompts
    monkeypatch.setitem(TASKS, "toy", toy)
    assert sorted(p["prompt"] for p in generate_pairs("toy", 3, seed=0)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="cannot produce 4 distinct prompts"):
        generate_pairs("toy", 4, seed=0)
