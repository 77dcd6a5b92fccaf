"""Issue 16 through both data paths: fuzzed files (tests/fuzz_data.py) never end a run and lose no row.

* Ray Data vs in-process (hypothesis, bounded examples, on the session's one local Ray): the same stats, the same
  rows kept in the same order (token ids row for row), the same quarantine, and every row read accounted for.
* Training on fuzzed data in-process (hypothesis): the run completes, every metric is finite, the model is
  exported; an eval set that ends up empty or fully quarantined means no evaluation, never a crash.
* One Ray Train run on a file of every degenerate row and an eval file whose rows are all quarantined.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given

from orpo_ray.config import load_config
from orpo_ray.data.prepare import prepare_data
from orpo_ray.data.records import DamagedFileError
from orpo_ray.data.ray_pipeline import tokenized_datasets
from orpo_ray.embedded_tokenizer import build_byte_tokenizer
from orpo_ray.train.loop import train_loop_per_worker
from tests.fuzz_data import ODD, check_accounting, check_quarantine_file, data_files, materialize, profile
from tests.integration.ray_train_helpers import DEMO, TINY

pytestmark = pytest.mark.integration
KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
RUN = ["train.per_device_batch_size=4", "train.max_steps=2", "train.warmup_steps=0", "train.eval_max_batches=1"]


def token_rows(rows) -> list[list[list[int]]]:
    return [[[int(t) for t in r[k]] for k in KEYS] for r in rows]


@profile(max_examples=3)
@given(example=data_files())
def test_ray_data_and_in_process_keep_the_same_rows(_ray_local_session, example):
    tok = build_byte_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        overrides, rows_written, files = materialize(example, Path(tmp))
        cfg = load_config(None, [f"output_dir={tmp}/ray", f"data.cache_dir={tmp}/cache", *overrides])
        datasets, stats = tokenized_datasets(cfg, tok)
        local = prepare_data(cfg, tok)
        assert {k: stats[k] for k in local.stats} == local.stats
        check_accounting(stats, rows_written)
        assert token_rows(datasets["train"].take_all()) == token_rows(local.train_rows)
        assert token_rows(datasets["eval"].take_all()) == token_rows(local.eval_rows)
        ray_quarantine = check_quarantine_file(Path(tmp) / "ray" / "quarantine.jsonl", files)
        assert sorted(ray_quarantine) == sorted((q.source, q.row, q.reason) for q in local.quarantined)


def check_results(out: Path) -> dict:
    """The run finished: results.json with finite metrics, a model, and eval metrics or the reason there are none."""
    results = json.loads((out / "results.json").read_text())
    assert (out / "model" / "model.safetensors").exists()
    assert results["train"] and all(math.isfinite(v) for v in results["train"].values()), results["train"]
    if results["data"]["eval_pairs"]:
        assert all(math.isfinite(v) for v in results["eval"].values()), results["eval"]
    else:
        assert "eval" not in results and results["eval_skipped"].startswith("no eval pairs")
    return results


@profile(max_examples=6)
@given(example=data_files())
def test_in_process_training_on_fuzzed_data_finishes_with_finite_metrics(example):
    with tempfile.TemporaryDirectory() as tmp:
        overrides, rows_written, _ = materialize(example, Path(tmp))
        cfg = load_config(DEMO, [*TINY, *RUN, f"output_dir={tmp}/out", *overrides])
        train_loop_per_worker(cfg.to_dict())
        check_accounting(check_results(Path(tmp) / "out")["data"], rows_written)


def degenerate_rows() -> list:
    valid = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(16)]
    odd = [{"prompt": a, "chosen": b, "rejected": c} for a, b, c in zip(ODD, ODD[1:] + ODD[:1], ODD[2:] + ODD[:2])]
    return valid + odd + [{"chosen": "x" * 5000, "rejected": "y"}, {"prompt": None, "chosen": 1, "rejected": []},
                          {"prompt": "p", "chosen": "same", "rejected": "same", "extra": {"k": 1}}]


def test_ray_train_on_degenerate_rows_with_a_fully_quarantined_eval_set(_ray_local_session, tmp_path):
    from orpo_ray.launch.trainer import run_training

    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in degenerate_rows()))
    evalp = tmp_path / "eval.jsonl"
    evalp.write_text('{"prompt": "q", "chosen": "c\\ud800", "rejected": "r"}\n{broken\n{"chosen": ""}\n')
    cfg = load_config(DEMO, [*TINY, *RUN, "data.max_chars=2000", "data.max_length=48", "data.max_prompt_length=24",
                             f"data.train_path={train}", f"data.eval_path={evalp}", f"output_dir={tmp_path / 'out'}",
                             f"data.cache_dir={tmp_path / 'cache'}", "scaling.num_workers=1"])
    run_training(cfg)
    results = check_results(tmp_path / "out")
    assert results["data"]["eval_pairs"] == 0 and results["data"]["rows_read"] == len(degenerate_rows()) + 3
    local = prepare_data(cfg, build_byte_tokenizer()).stats
    assert {k: results["data"][k] for k in local} == local


@pytest.mark.parametrize("which", ["train_path", "eval_path"])
@pytest.mark.parametrize("problem", ["missing", "damaged"])
def test_an_unreadable_file_stops_the_ray_data_path_with_the_in_process_error(_ray_local_session, tmp_path, which,
                                                                              problem):
    """Ray Data wraps a failed task's error in pages of its own; the driver raises the reader's error itself, the
    same type and message as the in-process path, so the CLI prints it in one line (tests/unit/test_bad_input.py)."""
    present = tmp_path / "pairs.jsonl"
    present.write_text(json.dumps({"prompt": "Q?", "chosen": " yes", "rejected": " no"}) + "\n")
    unreadable = tmp_path / "nowhere.jsonl"
    if problem == "damaged":
        unreadable = tmp_path / "plain.jsonl.gz"
        unreadable.write_text(present.read_text())  # named .gz, not gzip
    paths = {"train_path": present, "eval_path": present, which: unreadable}
    cfg = load_config(None, [f"output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/cache",
                             *(f"data.{k}={v}" for k, v in paths.items())])
    error = {"missing": FileNotFoundError, "damaged": DamagedFileError}[problem]
    with pytest.raises(error) as ray_error:
        tokenized_datasets(cfg, build_byte_tokenizer())
    with pytest.raises(error) as local_error:
        prepare_data(cfg, build_byte_tokenizer())
    assert type(ray_error.value) is error
    assert str(ray_error.value) == str(local_error.value)
    expected = {"missing": f"preference data file not found: {unreadable}",
                "damaged": f"{unreadable}: damaged at row 1"}[problem]
    assert str(ray_error.value).startswith(expected)
