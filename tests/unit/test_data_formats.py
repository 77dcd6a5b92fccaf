"""Preference rows in three formats, quarantine reasons, and the flat-row round trip for Ray Data."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orpo_ray.data import (PreferencePair, Quarantined, detect_format, iter_parsed, pair_to_row, read_pairs,
                           row_to_pair)

HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this",
      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_detect_formats():
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}) == "pairs"
    assert detect_format(HH) == "hh"
    msgs = [{"role": "assistant", "content": "x"}]
    assert detect_format({"prompt": "p", "chosen": msgs, "rejected": msgs}) == "conversational"
    with pytest.raises(ValueError, match="matches no known format"):
        detect_format({"text": "x"})


def test_hh_splits_at_the_last_assistant_turn(tmp_path):
    pairs, quarantined = read_pairs(write_jsonl(tmp_path / "hh.jsonl", [HH]))
    assert quarantined == []
    (pair,) = pairs
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" like this", " go away")
    assert (pair.source, pair.row) == (str(tmp_path / "hh.jsonl"), 1)


def test_conversational_with_and_without_explicit_prompt(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    rows = [{"prompt": [user], "chosen": [good], "rejected": [bad]},
            {"chosen": [user, good], "rejected": [user, bad]}]
    pairs, quarantined = read_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert quarantined == []
    for pair in pairs:
        assert pair.prompt == [user] and pair.chosen == [good] and pair.rejected == [bad]


@pytest.mark.parametrize("row, reason", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "row is list, expected a JSON object"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "c", "rejected": 7}, "field 'rejected' is int, expected str"),
    ({"prompt": "p", "chosen": "   ", "rejected": "r"}, "empty chosen response"),
])
def test_bad_pairs_rows_are_quarantined_with_row_and_reason(tmp_path, row, reason):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    pairs, quarantined = read_pairs(write_jsonl(tmp_path / "d.jsonl", [good, row, good]))
    assert len(pairs) == 2 and [p.row for p in pairs] == [1, 3]
    (q,) = quarantined
    assert q.row == 2 and q.reason.startswith(reason) and q.source.endswith("d.jsonl") and q.excerpt


def test_hh_rows_whose_prompts_differ_or_lack_an_assistant_turn(tmp_path):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: y"}]
    _, quarantined = read_pairs(write_jsonl(tmp_path / "hh.jsonl", [HH] + rows))
    assert [(q.row, q.reason) for q in quarantined] == [
        (2, "chosen and rejected do not share a prompt"), (3, "chosen has no '\\n\\nAssistant:' turn")]


def test_invalid_utf8_in_gzip_is_quarantined(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode() + b"\n")
        f.write(b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}\n')
    pairs, quarantined = read_pairs(path)
    assert len(pairs) == 1 and quarantined[0].row == 2 and "UTF-8" in quarantined[0].reason


def test_parquet_input(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"]}), path)
    pairs, quarantined = read_pairs(path)
    assert [(p.prompt, p.row) for p in pairs] == [("p1", 1), ("p2", 2)] and quarantined == []


def test_missing_file_and_unknown_extension_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"d\.csv: unsupported file type"):
        read_pairs(tmp_path / "d.csv")


def test_a_row_of_another_format_later_in_the_file_is_quarantined(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, HH]
    items = list(iter_parsed(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert isinstance(items[0], PreferencePair)
    assert isinstance(items[1], Quarantined) and items[1].reason == "missing field 'prompt'"


def test_flat_rows_round_trip():
    msgs = [{"role": "assistant", "content": "x"}]
    for pair in (PreferencePair("p", "c", "r", "f", 3),
                 PreferencePair([{"role": "user", "content": "q"}], msgs, msgs, "f", 4)):
        row = pair_to_row(pair)
        assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
        assert row_to_pair(row) == pair
