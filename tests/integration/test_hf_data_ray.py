"""Ray Data path on a `datasets` save_to_disk DatasetDict: the same pairs, quarantine and stats as in-process."""

from __future__ import annotations

import datasets
import pytest

from orpo_ray.config import load_config
from orpo_ray.data.prepare import prepare_data
from orpo_ray.data.ray_pipeline import tokenized_datasets
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

pytestmark = pytest.mark.integration

ROWS = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(40)]
ROWS[3] = {"prompt": "Q3?", "chosen": " same", "rejected": " same"}  # identical: no ORPO signal
ROWS[7] = {"prompt": "Q7?", "chosen": "", "rejected": " no"}         # quarantined


@pytest.mark.parametrize("drop", [False, True])
def test_saved_dataset_dict_through_ray_data_matches_the_in_process_path(_ray_local_session, tmp_path, drop):
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:5])}).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(None, [f"data.train_path={tmp_path / 'dd'}", f"output_dir={tmp_path / 'out'}",
                             f"data.drop_identical_pairs={str(drop).lower()}"])
    tok = build_byte_tokenizer()
    ds, stats = tokenized_datasets(cfg, tok)
    local = prepare_data(cfg, tok).stats
    assert {k: stats[k] for k in local} == local
    # train: 40 rows - 1 quarantined (row 8) - the identical pair if dropped; test: ROWS[:5] holds the identical pair
    assert (stats["train_pairs"], stats["eval_pairs"], stats["quarantined"]) == (39 - drop, 5 - drop, 1)
    assert stats["quarantined_by_reason"] == {"empty chosen response": 1}
    assert (stats["identical_pairs"], stats["dropped_identical_pairs"]) == (2, 2 if drop else 0)
    assert ds["train"].count() == stats["train_pairs"]
    assert stats["sources"] == [str(tmp_path / "dd" / "train"), str(tmp_path / "dd" / "test")]
