"""data-report counts on a file whose contents are known row by row."""

import json

import pytest

from orpo_ray.config import load_config
from orpo_ray.commands.data_report import build_report, nearly_identical, padding_waste, percentiles, run_data_report
from orpo_ray.data.prepare import prepare_data
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

TOK = build_byte_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def make_cfg(tmp_path, *extra):
    rows = [{"prompt": "same prompt", "chosen": " abc", "rejected": " abc"},               # identical -> no signal
            {"prompt": "same prompt", "chosen": " x" * 20, "rejected": " x" * 19 + " y"},  # nearly identical
            {"prompt": "p" * 60, "chosen": " long answer", "rejected": " no"},             # prompt gets cut
            "{broken",                                                                     # quarantined
            {"prompt": "q", "chosen": "", "rejected": " r"}]                               # quarantined
    path = write(tmp_path / "d.jsonl", rows)
    return load_config(None, [f"data.train_path={path}", f"data.eval_path={path}", "data.max_length=64",
                              "data.max_prompt_length=16", "train.per_device_batch_size=2",
                              f"output_dir={tmp_path / 'out'}", *extra])


def test_report_counts_on_known_rows(tmp_path):
    report = build_report(make_cfg(tmp_path), TOK)
    assert report["pairs"] == {"train": 3, "eval": 3}
    assert report["quarantined"]["total"] == 4  # 2 bad rows, read once as train and once as eval
    reasons = report["quarantined"]["by_reason"]
    assert reasons["empty chosen response"]["count"] == 2 and reasons["empty chosen response"]["examples"][0]["row"] == 5
    assert report["no_signal_pairs"]["identical"] == 2 and report["no_signal_pairs"]["nearly_identical"] == 2
    # train and eval are the same file: "same prompt" twice in each (1 repeat each), every eval prompt in train
    assert report["duplicate_prompts"] == {"train": 1, "eval": 1, "eval_pairs_with_a_train_prompt": 3}
    assert report["truncation"]["pairs_cut"] == 2  # the 40-char prompt, in train and eval
    assert report["truncation"]["prompt_tokens_cut"] == 2 * (61 - 16)  # BOS + 60 bytes kept to 16
    # each row under its own shape: the broken line has none
    assert report["rows_by_format"] == {"pairs": {"pairs": 6, "quarantined": 2}, "unknown": {"quarantined": 2}}
    assert report["tokens_untruncated"]["prompt"]["max"] == 60


def test_drop_identical_pairs_removes_them_from_training_data(tmp_path):
    kept = prepare_data(make_cfg(tmp_path), TOK)
    dropped = prepare_data(make_cfg(tmp_path, "data.drop_identical_pairs=true"), TOK)
    assert len(kept.train_rows) - len(dropped.train_rows) == 1
    # train and eval are the same file: one identical pair in each, counted before any drop
    assert (kept.stats["identical_pairs"], kept.stats["dropped_identical_pairs"]) == (2, 0)
    assert (dropped.stats["identical_pairs"], dropped.stats["dropped_identical_pairs"]) == (2, 2)


def test_padding_waste_by_hand():
    # one batch of 2 pairs: sequence lengths 2+1, 2+3, 1+1, 1+1 -> real 12, padded 4 x 5 = 20 -> waste 0.4
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
            {"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4]}]
    assert abs(padding_waste(rows, 2) - 0.4) < 1e-12


def test_percentiles():
    assert percentiles(list(range(1, 101))) == {"p50": 51, "p90": 91, "p99": 100, "max": 100, "mean": 50.5}


# ------------------------------------------------------------------------------------ every input kind
KNOWN = [{"prompt": "p1", "chosen": " a", "rejected": " a"},       # identical
         {"prompt": "p1", "chosen": " bb", "rejected": " c"},      # duplicate prompt
         {"prompt": "p" * 40, "chosen": " d", "rejected": " e"},   # BOS+40+2 > 32: prompt cut to 16 (25 cut)
         {"prompt": "p3", "chosen": "", "rejected": " f"}]         # quarantined: empty chosen response


def write_kind(kind: str, tmp_path) -> str:
    if kind == "jsonl":
        return write(tmp_path / "d.jsonl", KNOWN)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(KNOWN), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    import datasets  # a `datasets` save_to_disk directory

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(KNOWN).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved_dataset"])
def test_same_rows_same_report_from_every_input_kind(tmp_path, kind):
    path = write_kind(kind, tmp_path)
    cfg = load_config(None, [f"data.train_path={path}", f"data.eval_path={path}", "data.max_length=32",
                             "data.max_prompt_length=16", "train.per_device_batch_size=2",
                             f"output_dir={tmp_path / 'out'}"])
    report = build_report(cfg, TOK)
    assert report["sources"] == [path, path]
    assert report["rows_by_format"] == {"pairs": {"pairs": 6, "quarantined": 2}}
    assert report["pairs"] == {"train": 3, "eval": 3}
    assert report["quarantined"]["by_reason"]["empty chosen response"]["examples"][0]["row"] == 4
    assert report["no_signal_pairs"]["identical"] == 2 and report["duplicate_prompts"]["train"] == 1
    t = report["truncation"]
    assert (t["pairs_cut"], t["prompt_tokens_cut"], t["response_tokens_cut"]) == (2, 2 * (41 - 16), 0)
    assert t["tokens_cut_per_cut_pair"]["max"] == 25
    # chosen " a", " bb", " d" (no EOS), twice: [2, 2, 2, 2, 3, 3]; p50 = sorted[int(0.5 * 6)] = 2
    assert report["tokens_untruncated"]["chosen"] == {"p50": 2, "p90": 3, "p99": 3, "max": 3, "mean": 2.3}


def test_run_data_report_writes_json_and_png_and_prints_the_headlines(tmp_path, capsys):
    cfg = load_config(None, [f"data.train_path={write_kind('jsonl', tmp_path)}", "data.eval_fraction=0.0",
                             "data.max_length=64", "data.max_prompt_length=16", "tracking.enabled=false",
                             f"output_dir={tmp_path / 'out'}"])
    report = run_data_report(cfg)
    written = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert written == report and "_raw_lengths" not in written
    assert (tmp_path / "out" / "data_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "pairs: train 3, eval 0; quarantined 1" in out
    assert "1 x empty chosen response (e.g. row 4)" in out
    assert "warning: 1 pairs have identical chosen and rejected tokens" in out


def test_nearly_identical_by_hand():
    assert nearly_identical({"chosen_ids": list(range(40)), "rejected_ids": list(range(39)) + [99]})  # 39/40 same
    assert not nearly_identical({"chosen_ids": list(range(10)), "rejected_ids": list(range(9)) + [99]})  # 0.9
    assert not nearly_identical({"chosen_ids": [1, 2], "rejected_ids": [1, 2]})  # identical is counted apart
    # the same tokens in reverse order: quick_ratio (multiset overlap) is 1.0, the real ratio is low
    assert not nearly_identical({"chosen_ids": list(range(40)), "rejected_ids": list(range(39, -1, -1))})


def test_eval_prompts_seen_in_training_are_counted(tmp_path):
    train = write(tmp_path / "t.jsonl", KNOWN)
    evalp = write(tmp_path / "e.jsonl", [{"prompt": "p1", "chosen": " x", "rejected": " y"},
                                         {"prompt": "new", "chosen": " x", "rejected": " y"}])
    cfg = load_config(None, [f"data.train_path={train}", f"data.eval_path={evalp}", f"output_dir={tmp_path / 'o'}"])
    assert build_report(cfg, TOK)["duplicate_prompts"] == {"train": 1, "eval": 0, "eval_pairs_with_a_train_prompt": 1}
