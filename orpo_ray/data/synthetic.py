"""A deterministic synthetic preference task for the embedded default (no download, learnable in a minute).

"sort": the prompt asks to sort a handful of letters; the chosen answer is the sorted string, the rejected
one a near miss (one adjacent pair swapped, or one letter replaced). Rejected shares most of its tokens
with chosen - so SFT on chosen raises rejected too, the effect ORPO's odds-ratio term is there to undo
(the paper's Fig. 3) - yet a tiny model can learn the rule that separates them (letters ascend).
"pick" (below) is the evidence task for SFT vs ORPO. Tasks are looked up by name in `TASKS`.

Held-out pairs share no *problem* with training pairs (for "sort": no letter set), so eval accuracy
measures the rule, not recall of training answers.

Pure module: stdlib only.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

GENERATOR_VERSION = 2  # bump when the generated pairs change (v2: train/eval disjoint by problem)
LETTERS = string.ascii_lowercase[:12]  # a small alphabet keeps the task learnable by a 0.4M-parameter model


def _sort_example(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(4, 7)
    letters = rng.sample(LETTERS, n)
    chosen = "".join(sorted(letters))
    wrong = list(chosen)
    if rng.random() < 0.5:  # swap one adjacent pair: same letters, wrong order
        i = rng.randrange(n - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:  # replace one letter with one that was not in the prompt
        i = rng.randrange(n)
        wrong[i] = rng.choice([c for c in LETTERS if c not in letters])
    return f"Sort: {''.join(letters)}\nAnswer:", " " + chosen, " " + "".join(wrong)


def _pick_example(rng: random.Random) -> tuple[str, str, str]:
    """"pick": any letter of the prompt is a valid answer, earlier letters are preferred.

    The chosen letter is uniform over all ranks but the last, the rejected one uniform over the letters after
    it. So the chosen answers alone say little more than "a letter of the prompt, not the largest" - SFT
    learns that and ranks the rest of a pair near chance - while the pairs say "earlier is better", which
    ORPO's odds-ratio term can learn. The evidence task for SFT vs ORPO (docs: configs/evidence/).
    """
    n = rng.randint(5, 9)
    letters = rng.sample(string.ascii_lowercase, n)
    ranked = sorted(letters)
    win = rng.randrange(n - 1)
    lose = rng.randrange(win + 1, n)
    return f"Pick one: {' '.join(letters)}\nAnswer:", " " + ranked[win], " " + ranked[lose]


@dataclass(frozen=True)
class Task:
    """A generator of (prompt, chosen, rejected) and the problem a pair poses.

    Train and eval share no problem, not merely no prompt: "Sort: dcba" and "Sort: abcd" are two prompts but
    one problem (answer " abcd"), and an eval set that repeats training answers would measure recall.
    """

    make: Callable[[random.Random], tuple[str, str, str]]
    problem: Callable[[dict], str] = lambda pair: pair["prompt"]


TASKS: dict[str, Task] = {
    "sort": Task(_sort_example, problem=lambda pair: pair["chosen"]),  # the sorted letters = the letter set
    "pick": Task(_pick_example),
}
DEFAULT_TASK = "sort"


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r} (known: {sorted(TASKS)})")
    return TASKS[name]


def generate_pairs(task: str, n: int, seed: int, exclude_problems: Collection[str] = frozenset()) -> list[dict]:
    """`n` distinct-prompt pairs of `task`, none posing a problem in `exclude_problems`; identical for the
    same arguments (a string-seeded `random.Random` is stable across processes and platforms)."""
    spec, rng = _task(task), random.Random(f"{task}:{seed}")
    seen, pairs, attempts = set(), [], 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # a task space too small for n must fail loudly, not loop forever
            raise ValueError(f"task {task!r} cannot produce {n} distinct prompts")
        prompt, chosen, rejected = spec.make(rng)
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if prompt not in seen and spec.problem(pair) not in exclude_problems:
            seen.add(prompt)
            pairs.append(pair)
    return pairs


def write_synthetic_split(out_dir: str | Path, task: str, num_train: int, num_eval: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl sharing no problem; written once (same arguments, same files), atomically."""
    problem = _task(task).problem
    # The generator version in the name keeps files written by an older generator from being reused.
    out = Path(out_dir) / f"{task}-v{GENERATOR_VERSION}-seed{seed}-{num_train}-{num_eval}"
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    if train_path.exists() and eval_path.exists():
        return train_path, eval_path
    out.mkdir(parents=True, exist_ok=True)
    evals = generate_pairs(task, num_eval, seed + 1_000_003)
    train = generate_pairs(task, num_train, seed, exclude_problems={problem(p) for p in evals})
    for path, rows in ((train_path, train), (eval_path, evals)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)
    return train_path, eval_path
