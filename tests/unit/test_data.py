"""orpo_ray.data.records: the three formats, every quarantine reason, file types, and the flat-row round trip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orpo_ray.data.records import (PreferencePair, Quarantined, detect_format, iter_records, pair_to_row, parse_record,
                           read_pairs, row_to_pair, write_quarantine)

PAIR = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
USER, USER2 = {"role": "user", "content": "hi"}, {"role": "user", "content": "and?"}
HELLO = {"role": "assistant", "content": "hello"}
GOOD, BAD = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: good",
      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bad"}


def jsonl(path: Path, rows: list) -> Path:
    """Rows as lines; a str row is written verbatim (to plant broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def only_quarantined(tmp_path: Path, rows: list) -> Quarantined:
    pairs, quarantined = read_pairs(jsonl(tmp_path / "d.jsonl", rows))
    assert len(quarantined) == 1, (pairs, quarantined)
    return quarantined[0]


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("record, fmt", [
    (PAIR, "pairs"),
    (HH, "hh"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational"),
    ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "conversational"),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


@pytest.mark.parametrize("record", [{"text": "x"}, {"prompt": "p", "chosen": 1, "rejected": "r"}])
def test_detect_format_rejects_records_of_no_known_shape(record):
    with pytest.raises(ValueError, match="matches no known format"):
        detect_format(record)


def test_pairs_rows_keep_source_and_line_number(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [PAIR, "", PAIR])  # a blank line is skipped but still counted
    pairs, quarantined = read_pairs(path)
    assert quarantined == []
    assert pairs == [PreferencePair("Q?", " yes", " no", str(path), 1), PreferencePair("Q?", " yes", " no", str(path), 3)]


def test_hh_splits_at_the_last_assistant_marker():
    pair = parse_record(HH, "hh", "f", 7)
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" good", " bad")


def test_conversational_with_explicit_prompt_messages_or_string():
    pair = parse_record({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational", "f", 1)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([USER], [GOOD], [BAD])
    pair = parse_record({"prompt": "hi", "chosen": [GOOD], "rejected": [BAD]}, "conversational", "f", 1)
    assert pair.prompt == [USER]  # a string prompt is the user's turn


def test_conversational_without_prompt_takes_the_shared_leading_messages():
    record = {"chosen": [USER, HELLO, USER2, GOOD], "rejected": [USER, HELLO, USER2, BAD, GOOD]}
    pair = parse_record(record, "conversational", "f", 1)
    assert pair.prompt == [USER, HELLO, USER2]
    assert pair.chosen == [GOOD] and pair.rejected == [BAD, GOOD]  # every remaining assistant message


def test_identical_conversations_keep_the_last_message_as_the_response():
    pair = parse_record({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "conversational", "f", 1)
    assert pair.prompt == [USER] and pair.chosen == pair.rejected == [GOOD]


# ------------------------------------------------------------------------------------ quarantine reasons
@pytest.mark.parametrize("row, reason", [
    ("{not json", "invalid JSON"),
    ('["a", "b"]', "row is list, expected a JSON object"),
    ("42", "row is int, expected a JSON object"),
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' is int, expected str"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "field 'chosen' is null, expected str"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "r"}, "empty chosen response"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "empty rejected response"),
])
def test_bad_pairs_rows_are_quarantined_with_their_line_and_reason(tmp_path, row, reason):
    pairs, quarantined = read_pairs(jsonl(tmp_path / "d.jsonl", [PAIR, row, PAIR]))
    assert [p.row for p in pairs] == [1, 3]
    (q,) = quarantined
    assert (q.row, q.source) == (2, str(tmp_path / "d.jsonl"))
    assert q.reason.startswith(reason), q.reason
    assert q.excerpt and len(q.excerpt) <= 200


def test_a_malformed_first_row_gets_a_specific_reason_and_does_not_fix_the_format(tmp_path):
    q = only_quarantined(tmp_path, [{"prompt": "p", "chosen": 3, "rejected": "r"}, HH])
    assert (q.row, q.reason) == (1, "field 'chosen' is int, expected str")  # HH on line 2 still parses


def test_a_row_of_another_shape_is_read_in_its_own_format(tmp_path):
    pairs, quarantined = read_pairs(jsonl(tmp_path / "d.jsonl", [PAIR, HH, {"prompt": [USER], "chosen": [GOOD],
                                                                             "rejected": [BAD]}]))
    assert [(p.row, isinstance(p.chosen, str)) for p in pairs] == [(1, True), (2, True), (3, False)]
    assert quarantined == []


def test_hh_rows_with_different_prompts_or_no_assistant_turn(tmp_path):
    differ = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    no_turn = {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: y"}
    no_turn_rejected = {"chosen": "\n\nHuman: a\n\nAssistant: y", "rejected": "\n\nHuman: a"}
    empty = {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: y"}
    path = jsonl(tmp_path / "hh.jsonl", [HH, differ, no_turn, no_turn_rejected, empty])
    _, quarantined = read_pairs(path)
    assert [(q.source, q.row, q.reason) for q in quarantined] == [
        (str(path), 2, "chosen and rejected do not share a prompt"),
        (str(path), 3, "chosen has no '\\n\\nAssistant:' turn"),
        (str(path), 4, "rejected has no '\\n\\nAssistant:' turn"),
        (str(path), 5, "empty chosen response")]


def test_a_record_matching_no_format_is_quarantined(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "x"}, PAIR, {"text": "y"}])
    pairs, quarantined = read_pairs(path)
    assert [p.row for p in pairs] == [2]
    assert [(q.source, q.row) for q in quarantined] == [(str(path), 1), (str(path), 3)]
    assert all("matches no known format" in q.reason for q in quarantined)


@pytest.mark.parametrize("record, reason", [
    ({"chosen": [USER, GOOD], "rejected": [USER2, BAD]}, "chosen and rejected share no leading messages"),
    ({"prompt": [USER], "chosen": [USER2], "rejected": [BAD]}, "responses must be assistant messages"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [{"role": "assistant", "content": " "}]},
     "empty rejected response"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": "bad"}, "field 'rejected' is str, expected list of messages"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [{"text": "bad"}]}, "chosen/rejected must be lists of"),
    ({"prompt": [{"role": "user", "content": 5}], "chosen": [GOOD], "rejected": [BAD]},
     "message content must be a string"),
])
def test_bad_conversational_rows(record, reason):
    q = parse_record(record, "conversational", "f", 9)
    assert isinstance(q, Quarantined) and q.reason.startswith(reason) and q.row == 9


def test_undecodable_bytes_in_a_gzipped_jsonl_are_quarantined(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(PAIR).encode() + b"\n")
        f.write(b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}\n')
        f.write(json.dumps(PAIR).encode() + b"\n")
    pairs, (q,) = read_pairs(path)
    assert [p.row for p in pairs] == [1, 3]
    assert q.row == 2 and q.reason.startswith("not valid UTF-8") and "prompt" in q.excerpt


# ------------------------------------------------------------------------------------------ file types
def test_parquet_rows_including_nulls_and_nested_messages(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "chosen": ["c1", None], "rejected": ["r1", "r2"]}), path)
    pairs, (q,) = read_pairs(path)
    assert [(p.prompt, p.chosen, p.row) for p in pairs] == [("p1", "c1", 1)]
    assert (q.row, q.reason) == (2, "field 'chosen' is null, expected str")

    conv = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"chosen": [USER, GOOD], "rejected": [USER, BAD]}]), conv)
    (pair,), _ = read_pairs(conv)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([USER], [GOOD], [BAD])


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([PAIR, "oops", PAIR]))
    pairs, (q,) = read_pairs(path)
    assert [p.row for p in pairs] == [1, 3] and (q.row, q.reason) == (2, "row is str, expected a JSON object")


def test_missing_file_and_unknown_extension_raise_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_records(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"d\.csv"):
        read_pairs(tmp_path / "d.csv")


def test_write_quarantine_is_jsonl_with_the_four_fields(tmp_path):
    items = [Quarantined("a.jsonl", 2, "invalid JSON", "{x"), Quarantined("a.jsonl", 5, "empty chosen response", "{}")]
    path = write_quarantine(tmp_path / "sub" / "q.jsonl", items)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"source": "a.jsonl", "row": 2, "reason": "invalid JSON", "excerpt": "{x"},
                     {"source": "a.jsonl", "row": 5, "reason": "empty chosen response", "excerpt": "{}"}]


# --------------------------------------------------------------------------------- flat rows (Ray Data)
def test_pairs_of_every_format_share_one_arrow_schema_and_round_trip():
    pairs = [PreferencePair("p", "c", "r", "f", 3), PreferencePair([USER], [GOOD], [BAD], "g", 4)]
    table = pa.Table.from_pylist([pair_to_row(p) for p in pairs])  # one schema: Arrow would raise otherwise
    assert {table.schema.field(k).type for k in ("prompt", "chosen", "rejected")} == {pa.string()}
    assert [row_to_pair(r) for r in table.to_pylist()] == pairs
    # Ray's numpy batches hand back numpy scalars
    numpy_row = {k: np.array([v])[0] for k, v in pair_to_row(pairs[1]).items()}
    assert row_to_pair(numpy_row) == pairs[1]
