"""Hugging Face inputs: save_to_disk directories (Dataset and DatasetDict) and hub ids that fail fast offline."""

from __future__ import annotations

import json
import socket
import time

import datasets
import pytest

from orpo_ray.config import ConfigError, load_config
from orpo_ray.data.records import read_pairs
from orpo_ray.data.hf import HubUnavailableError, hub_name, iter_saved_dataset, require_hub
from orpo_ray.data.prepare import fingerprint, prepare_data, read_splits, resolve_sources
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

datasets.disable_progress_bars()
TOK = build_byte_tokenizer()
ROWS = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(12)]
ROWS[4] = {"prompt": "Q4?", "chosen": " ", "rejected": " no"}  # quarantined: empty chosen response
USER = {"role": "user", "content": "hi"}


def save(rows: list[dict], path, **kw) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(path), **kw)
    return str(path)


def save_dict(path, splits: dict[str, list[dict]]) -> str:
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", *overrides])


# ---------------------------------------------------------------------------------- save_to_disk dirs
def test_a_saved_dataset_reads_like_a_file_with_row_numbers_across_shards(tmp_path):
    path = save(ROWS, tmp_path / "ds", num_shards=3)
    assert len(json.loads((tmp_path / "ds" / "state.json").read_text())["_data_files"]) == 3
    pairs, (q,) = read_pairs(path)
    assert [p.row for p in pairs] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert (pairs[4].prompt, pairs[4].chosen, pairs[4].rejected, pairs[4].source) == ("Q5?", " yes 5", " no 5", path)
    assert (q.source, q.row, q.reason) == (path, 5, "empty chosen response")


def test_large_record_batches_are_read_in_slices_without_losing_rows(tmp_path, monkeypatch):
    monkeypatch.setattr("orpo_ray.data.hf.BATCH_ROWS", 5)  # 12 rows in one Arrow batch -> slices of 5, 5, 2
    rows = [r for _, r in iter_saved_dataset(save(ROWS, tmp_path / "ds"))]
    assert rows == ROWS


def test_a_shuffled_selection_is_read_in_its_saved_order(tmp_path):
    ds = datasets.Dataset.from_list(ROWS).shuffle(seed=0).select(range(5))  # an indices mapping, flattened on save
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [r for _, r in iter_saved_dataset(tmp_path / "ds")] == ds.to_list()


def test_conversational_rows_in_a_saved_dataset(tmp_path):
    row = {"chosen": [USER, {"role": "assistant", "content": "x"}],
           "rejected": [USER, {"role": "assistant", "content": "y"}]}
    (pair,), _ = read_pairs(save([row], tmp_path / "conv"))
    assert pair.prompt == [USER] and pair.chosen[0]["content"] == "x" and pair.rejected[0]["content"] == "y"


def test_directories_that_are_not_one_dataset_are_refused_naming_them(tmp_path):
    root = save_dict(tmp_path / "dd", {"train": ROWS[:3], "test": ROWS[3:4]})
    with pytest.raises(ValueError, match=r"dd: a saved DatasetDict \(splits: \['train', 'test'\]\)"):
        read_pairs(root)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain: a directory, but not one written by"):
        read_pairs(tmp_path / "plain")


# ------------------------------------------------------------------------------------------- splits
def test_a_dataset_dict_gives_train_and_eval_splits(tmp_path):
    root = save_dict(tmp_path / "dd", {"train": ROWS, "test": ROWS[:2]})
    sources = resolve_sources(cfg_for(tmp_path, f"data.train_path={root}"))
    assert (sources.train_path, sources.eval_path) == (f"{root}/train", f"{root}/test")
    prepared = prepare_data(cfg_for(tmp_path, f"data.train_path={root}"), TOK)
    assert (prepared.stats["train_pairs"], prepared.stats["eval_pairs"], prepared.stats["quarantined"]) == (11, 2, 1)
    # other split names, and an explicit eval path that is the same DatasetDict
    root2 = save_dict(tmp_path / "dd2", {"tr": ROWS[:6], "val": ROWS[6:8]})
    cfg = cfg_for(tmp_path, f"data.train_path={root2}", f"data.eval_path={root2}", "data.train_split=tr",
                  "data.eval_split=val")
    train, evals, quarantined, _ = read_splits(cfg)
    assert (len(train), len(evals), len(quarantined)) == (5, 2, 1)


def test_without_an_eval_split_eval_fraction_is_split_off_deterministically(tmp_path):
    root = save_dict(tmp_path / "dd", {"train": ROWS * 10})
    cfg = cfg_for(tmp_path, f"data.train_path={root}", "data.eval_fraction=0.25")
    train, evals, _, sources = read_splits(cfg)
    assert sources.eval_path is None and 0 < len(evals) < len(train) and len(train) + len(evals) == 110
    assert [p.row for p in read_splits(cfg)[1]] == [p.row for p in evals]


def test_a_missing_split_is_named_with_the_splits_there_are(tmp_path):
    root = save_dict(tmp_path / "dd", {"train": ROWS})
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: \['train'\]\)"):
        resolve_sources(cfg_for(tmp_path, f"data.train_path={root}", f"data.eval_path={root}",
                                "data.eval_split=validation"))


def test_the_cache_key_sees_a_re_saved_dataset_and_the_split(tmp_path):
    root = save_dict(tmp_path / "dd", {"train": ROWS, "test": ROWS[:2]})
    key = fingerprint(cfg_for(tmp_path, f"data.train_path={root}"), TOK)
    assert fingerprint(cfg_for(tmp_path, f"data.train_path={root}", "data.eval_split=train"), TOK) != key
    save_dict(tmp_path / "dd", {"train": ROWS * 2, "test": ROWS[:2]})
    assert fingerprint(cfg_for(tmp_path, f"data.train_path={root}"), TOK) != key


# ------------------------------------------------------------------------------------------ hub ids
def test_a_hub_id_fails_at_once_in_offline_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"hf://owner/name: HF_HUB_OFFLINE is set.*save_to_disk"):
        read_splits(cfg_for(tmp_path, "data.train_path=hf://owner/name"))
    assert time.perf_counter() - start < 0.5
    assert issubclass(HubUnavailableError, ConfigError)  # the CLI prints it as a config error, exit code 2


def test_a_hub_id_fails_fast_when_the_endpoint_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as s:  # a port nobody listens on: the connect is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=f"127.0.0.1:{port} is not reachable"):
        require_hub("hf://owner/name", timeout=0.5)
    assert time.perf_counter() - start < 0.6


def test_a_hub_probe_that_hangs_is_cut_at_the_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(5))  # e.g. a DNS lookup that hangs
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="no answer within 0.2 s"):
        require_hub("hf://owner/name", timeout=0.2)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("hub_id, name", [("hf://owner/name", "owner/name"), ("hf://datasets/a/b", "a/b")])
def test_hub_names(hub_id, name):
    assert hub_name(hub_id) == name


@pytest.mark.parametrize("hub_id", ["hf://name", "hf://a/b/c", "hf://a/"])
def test_malformed_hub_ids_are_config_errors(hub_id):
    with pytest.raises(ConfigError, match="hf://owner/name"):
        hub_name(hub_id)
