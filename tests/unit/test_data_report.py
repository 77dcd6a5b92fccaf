"""data-report counts on a file whose contents are known row by row."""

import json

from orpo_ray.config import load_config
from orpo_ray.data_report import build_report, padding_waste, percentiles
from orpo_ray.prepare import prepare_data
from orpo_ray.tokenizer import build_byte_tokenizer

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
    # train and eval are the same file: "same prompt" appears 4 times (3 repeats), the long prompt twice (1)
    assert report["duplicate_prompts"] == 4
    assert report["truncation"]["pairs_cut"] == 2  # the 40-char prompt, in train and eval
    assert report["truncation"]["prompt_tokens_cut"] == 2 * (61 - 16)  # BOS + 60 bytes kept to 16
    assert report["rows_by_format"] == {"pairs": {"pairs": 6, "quarantined": 4}}
    assert report["tokens_untruncated"]["prompt"]["max"] == 60


def test_drop_identical_pairs_removes_them_from_training_data(tmp_path):
    kept = prepare_data(make_cfg(tmp_path), TOK)
    dropped = prepare_data(make_cfg(tmp_path, "data.drop_identical_pairs=true"), TOK)
    assert len(kept.train_rows) - len(dropped.train_rows) == 1


def test_padding_waste_by_hand():
    # one batch of 2 pairs: sequence lengths 2+1, 2+3, 1+1, 1+1 -> real 12, padded 4 x 5 = 20 -> waste 0.4
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
            {"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4]}]
    assert abs(padding_waste(rows, 2) - 0.4) < 1e-12


def test_percentiles():
    assert percentiles(list(range(1, 101))) == {"p50": 51, "p90": 91, "p99": 100, "max": 100, "mean": 50.5}
