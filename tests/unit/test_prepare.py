"""orpo_ray.data.prepare: sources, the deterministic eval split, quarantine counting, stats, the cache key."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from orpo_ray.config import load_config
from orpo_ray.data.records import PreferencePair
from orpo_ray.data.prepare import (fingerprint, prepare_data, read_splits, resolve_sources, save_quarantine,
                              split_for_eval)
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

TOK = build_byte_tokenizer()
PAIR = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", *overrides])


# ------------------------------------------------------------------------------------------ eval split
def test_split_for_eval_is_deterministic_disjoint_and_order_independent():
    pairs = [PreferencePair("p", "c", "r", "a.jsonl", row) for row in range(1, 401)]
    train, evals = split_for_eval(pairs, 0.25)
    assert split_for_eval(pairs, 0.25) == (train, evals)
    assert {p.row for p in train}.isdisjoint({p.row for p in evals}) and len(train) + len(evals) == 400
    assert 60 <= len(evals) <= 140  # ~100 expected from a uniform hash
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    s_train, s_evals = split_for_eval(shuffled, 0.25)
    assert {p.row for p in s_evals} == {p.row for p in evals}  # by row identity, not by position
    assert split_for_eval(pairs, 0.0) == (pairs, [])


def test_eval_split_of_a_train_file_is_stable_across_reads(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{**PAIR, "prompt": f"Q{i}"} for i in range(200)])
    cfg = cfg_for(tmp_path, f"data.train_path={path}", "data.eval_fraction=0.2")
    train, evals, quarantined, sources = read_splits(cfg)
    assert sources.eval_path is None and quarantined == []
    assert 0 < len(evals) < 80 and len(train) + len(evals) == 200
    again = read_splits(cfg)
    assert [p.row for p in again[1]] == [p.row for p in evals]


# --------------------------------------------------------------------------------- quarantine and stats
def test_quarantined_rows_of_train_and_eval_files_are_counted_and_written(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [PAIR, "{broken", PAIR, {"prompt": "p", "chosen": "", "rejected": "r"}])
    evalp = jsonl(tmp_path / "e.jsonl", [PAIR, [1, 2]])
    cfg = cfg_for(tmp_path, f"data.train_path={train}", f"data.eval_path={evalp}")
    prepared = prepare_data(cfg, TOK)
    assert [(Path(q.source).name, q.row) for q in prepared.quarantined] == [("t.jsonl", 2), ("t.jsonl", 4),
                                                                            ("e.jsonl", 2)]
    assert prepared.stats == {"train_pairs": 2, "eval_pairs": 1, "quarantined": 3, "truncated_pairs": 0,
                              "quarantined_by_reason": {
                                  "invalid JSON: Expecting property name enclosed in double quotes (column 2)": 1,
                                  "empty chosen response": 1, "row is list, expected a JSON object": 1},
                              "identical_pairs": 0, "dropped_identical_pairs": 0, "rows_read": 6,
                              "dropped_over_limit": 0}
    lines = save_quarantine(prepared, tmp_path / "out").read_text().splitlines()
    assert [json.loads(line)["row"] for line in lines] == [2, 4, 2]


def test_truncated_pairs_and_pair_limits(tmp_path):
    rows = [PAIR, {"prompt": "x" * 50, "chosen": " y", "rejected": " z"}, PAIR]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = cfg_for(tmp_path, f"data.train_path={path}", f"data.eval_path={path}", "data.max_length=16",
                  "data.max_prompt_length=8", "data.max_eval_pairs=1")
    stats = prepare_data(cfg, TOK).stats
    assert (stats["train_pairs"], stats["eval_pairs"], stats["truncated_pairs"]) == (3, 1, 1)
    cfg = cfg_for(tmp_path, f"data.train_path={path}", f"data.eval_path={path}", "data.max_train_pairs=2")
    assert [r["row"] for r in prepare_data(cfg, TOK).train_rows] == [1, 2]


def test_a_file_without_valid_pairs_fails_naming_the_file_and_the_first_reason(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", ["{broken", {"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: no valid preference pairs \(2 rows quarantined; "
                                         r"first reason: invalid JSON"):
        prepare_data(cfg_for(tmp_path, f"data.train_path={path}"), TOK)


# ----------------------------------------------------------------------------------- sources and cache
def test_sources_synthetic_default_and_absolute_paths(tmp_path, monkeypatch):
    src = resolve_sources(cfg_for(tmp_path, "data.synthetic.num_train=20", "data.synthetic.num_eval=5"))
    assert src.synthetic and Path(src.train_path).is_file() and Path(src.eval_path).is_file()
    assert Path(src.train_path).is_relative_to((tmp_path / "out" / "data").resolve())
    monkeypatch.chdir(tmp_path)
    src = resolve_sources(cfg_for(tmp_path, "data.train_path=rel/d.jsonl"))
    assert src.train_path == str(tmp_path.resolve() / "rel/d.jsonl") and src.eval_path is None


def test_fingerprint_changes_with_settings_and_file_contents(tmp_path):
    path = tmp_path / "d.jsonl"
    jsonl(path, [PAIR])
    base = cfg_for(tmp_path, f"data.train_path={path}")
    key = fingerprint(base, TOK)
    assert fingerprint(cfg_for(tmp_path, f"data.train_path={path}"), TOK) == key
    assert fingerprint(cfg_for(tmp_path, f"data.train_path={path}", "data.max_length=256",
                               "data.max_prompt_length=128"), TOK) != key
    assert fingerprint(cfg_for(tmp_path, f"data.train_path={path}", "data.drop_identical_pairs=true"), TOK) != key
    jsonl(path, [PAIR, PAIR])  # the file grew
    assert fingerprint(base, TOK) != key


def test_fingerprint_tells_same_size_tokenizers_apart():
    """Two tokenizers with the same vocabulary size but different vocabularies (or chat templates, or
    special tokens) tokenize differently, so they must never share a cache."""
    from tokenizers import Tokenizer, models

    from orpo_ray.embedded_tokenizer import CHAT_TEMPLATE
    from transformers import PreTrainedTokenizerFast

    def word_tokenizer(words):
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            {w: i for i, w in enumerate(words)}, unk_token=words[0])), eos_token=words[1])
        tok.chat_template = CHAT_TEMPLATE
        return tok

    cfg = cfg_for(Path("/nonexistent"), "data.train_path=/nonexistent/d.jsonl")
    a, b = word_tokenizer(["<unk>", "</s>", "yes", "no"]), word_tokenizer(["<unk>", "</s>", "no", "yes"])
    assert len(a) == len(b)
    assert fingerprint(cfg, a) != fingerprint(cfg, b)
    assert fingerprint(cfg, word_tokenizer(["<unk>", "</s>", "yes", "no"])) == fingerprint(cfg, a)
    a.chat_template = "{{ messages[0]['content'] }}"
    assert fingerprint(cfg, a) != fingerprint(cfg, word_tokenizer(["<unk>", "</s>", "yes", "no"]))
    no_bos = build_byte_tokenizer()
    no_bos.bos_token = None
    assert fingerprint(cfg, no_bos) != fingerprint(cfg, TOK)


def test_fingerprint_sees_a_file_rewritten_within_the_same_second(tmp_path):
    path = tmp_path / "d.jsonl"
    jsonl(path, [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}])
    cfg = cfg_for(tmp_path, f"data.train_path={path}")
    second = 1_700_000_000 * 10**9
    os.utime(path, ns=(second, second))
    key, size = fingerprint(cfg, TOK), path.stat().st_size
    jsonl(path, [{"prompt": "Q!", "chosen": " yes", "rejected": " no"}])  # same size
    os.utime(path, ns=(second, second + 1000))  # 1 us later: the same whole second
    assert path.stat().st_size == size
    assert fingerprint(cfg, TOK) != key


def test_data_chat_template_setting_is_part_of_the_key(tmp_path):
    cfg = cfg_for(tmp_path, "data.train_path=x.jsonl")
    assert fingerprint(cfg, TOK) != fingerprint(cfg_for(tmp_path, "data.train_path=x.jsonl",
                                                        "data.chat_template=chatml"), TOK)
