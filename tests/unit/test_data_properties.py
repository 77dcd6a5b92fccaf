"""Property test (hypothesis) of the in-process data path on mixed files of valid and degenerate rows.

Whatever the rows, `prepare_data` finishes; every row read is counted once (train + eval + quarantined +
dropped identical + dropped over a limit == rows written); every quarantined row names its file, row and a
reason, in a quarantine.jsonl that is valid UTF-8; every kept row is a trainable row. The same examples go
through the Ray Data path and a training run in tests/integration/test_data_properties_ray.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given

from orpo_ray.config import load_config
from orpo_ray.data.prepare import prepare_data, save_quarantine
from tests.fuzz_data import MAX_LENGTH, check_accounting, check_quarantine_file, data_files, materialize, profile
from tests.unit.conftest import make_tokenizer

TOK = make_tokenizer()


@profile(max_examples=15)
@given(example=data_files())
def test_every_row_is_kept_or_accounted_for(example):
    with tempfile.TemporaryDirectory() as tmp:
        overrides, rows_written, files = materialize(example, Path(tmp))
        cfg = load_config(None, [f"output_dir={tmp}/out", *overrides])
        prepared = prepare_data(cfg, TOK)
        check_accounting(prepared.stats, rows_written)
        assert len(check_quarantine_file(save_quarantine(prepared, Path(tmp) / "out"), files)) \
            == prepared.stats["quarantined"]
        for row in prepared.train_rows + prepared.eval_rows:
            assert row["prompt_ids"] and row["chosen_ids"] and row["rejected_ids"]
            assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= MAX_LENGTH
