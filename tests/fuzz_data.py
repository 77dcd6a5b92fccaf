"""Hypothesis strategies for issue 16's property tests: mixed files of valid and degenerate preference rows.

`data_files()` draws a train file and (maybe) an eval file, each JSONL, JSONL.gz or Parquet, full of rows of
every shape the reader meets in the wild: the three formats, missing and extra keys, wrong types, empty and
whitespace strings, lone surrogates, control characters, RTL and combining text, strings over data.max_chars,
prompts longer than max_length, chosen == rejected, broken or too deeply nested JSON, invalid UTF-8, a BOM,
CRLF line ends, a truncated .gz.
The writer counts the rows it wrote (non-blank lines, Parquet rows) independently of the reader, so a test can
check that every row read is accounted for. Every train file starts with MIN_VALID plain pairs, so a run always
has something to train on; the eval file may end up empty or fully quarantined.

Used by tests/unit/test_data_properties.py and the integration property tests (in-process and Ray Data).
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

MAX_CHARS = 2000     # data.max_chars in these tests: "long" strings below exceed it
MAX_LENGTH = 48      # data.max_length; data.max_prompt_length is half of it
MIN_VALID = 8        # plain pairs at the top of every train file
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

ODD = ["", " ", "\t\r\n ", "مرحبا بالعالم", "שלום", "e\u0301\u0301\u0308", "\u202eevil\u202c", "a\x00b",
       "\x1b[31mred", "\u2028\u2029", "\ufeffbom inside", "😀👍🏽", "\ud800", "x\udfffy", "\\n\\nAssistant:"]
TEXT = st.one_of(
    st.text(max_size=24),                              # any code point but surrogates: controls, RTL, marks
    st.sampled_from(ODD),
    st.text(alphabet="abc ", min_size=60, max_size=120),  # longer than max_length tokens
    st.just("y" * (MAX_CHARS + 1)),                    # over data.max_chars
)
SIMPLE = st.text(alphabet="abcdefgh ?!", min_size=1, max_size=12)
WRONG = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": TEXT})


@st.composite
def pair_row(draw) -> dict:
    prompt, chosen = draw(TEXT), draw(TEXT)
    rejected = chosen if draw(st.booleans()) and draw(st.booleans()) else draw(TEXT)  # chosen == rejected often
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@st.composite
def hh_row(draw) -> dict:
    human = draw(TEXT)
    other = human if draw(st.integers(0, 3)) else draw(TEXT)  # mostly a shared prompt
    return {"chosen": f"\n\nHuman: {human}\n\nAssistant:{draw(TEXT)}",
            "rejected": f"\n\nHuman: {other}\n\nAssistant:{draw(TEXT)}"}


@st.composite
def conversational_row(draw) -> dict:
    reply = lambda: [{"role": "assistant", "content": draw(TEXT)}]  # noqa: E731
    row = {"chosen": reply(), "rejected": reply()}
    if draw(st.booleans()):
        row["prompt"] = draw(st.one_of(TEXT, st.lists(MESSAGE, max_size=3)))
    else:  # the prompt is the messages chosen and rejected share
        shared = draw(st.lists(MESSAGE, max_size=2))
        row = {"chosen": shared + row["chosen"], "rejected": shared + row["rejected"]}
    return row


@st.composite
def mangled(draw, row: dict) -> dict:
    """Drop, retype or add keys."""
    row = dict(row)
    action = draw(st.sampled_from(["drop", "retype", "extra", "none"]))
    if action == "drop" and row:
        row.pop(draw(st.sampled_from(sorted(row))))
    elif action == "retype" and row:
        row[draw(st.sampled_from(sorted(row)))] = draw(WRONG)
    elif action == "extra":
        row[draw(st.text(max_size=8))] = draw(st.one_of(TEXT, WRONG))
    return row


RECORD = st.one_of(pair_row(), hh_row(), conversational_row(),
                   st.one_of(pair_row(), hh_row(), conversational_row()).flatmap(mangled))
RAW_LINE = st.sampled_from([b"{broken", b"[1, 2]", b"null", b'"a string"', b"42", b'{"prompt": "\xff\xfe"}',
                            b'{"prompt": "p", "chosen": "c", "rejected": "r"', b"\xef\xbb\xbf{}",
                            b"[" * 5000 + b"]" * 5000])  # nested deeper than the JSON decoder recurses


def valid_pair(i: int) -> dict:
    return {"prompt": f"Question {i}?", "chosen": f" answer {i}", "rejected": f" wrong {i}"}


@dataclass
class DataFile:
    path: Path
    rows: int  # non-blank rows written: what the reader must account for


def _json_line(record: dict, ascii_only: bool) -> bytes:
    if ascii_only:
        return json.dumps(record).encode()
    # Raw UTF-8; a lone surrogate becomes CESU-8 bytes, i.e. invalid UTF-8 - another degenerate row.
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def file_spec(draw, valid_first: int) -> tuple:
    kind = draw(st.sampled_from(["jsonl", "jsonl.gz", "parquet"]))
    records = [valid_pair(i) for i in range(valid_first)]
    records += draw(st.lists(st.one_of(RECORD, RAW_LINE, SIMPLE.map(lambda s: valid_pair(s))), max_size=14))
    order = draw(st.permutations(range(len(records)))) if draw(st.booleans()) else range(len(records))
    return kind, [records[i] for i in order], draw(st.booleans()), draw(st.booleans()), draw(st.booleans())


def write_file(directory: Path, name: str, spec: tuple, damage: int = 0) -> DataFile:
    """damage 1..3: a .gz file is cut to damage/4 of its compressed size."""
    kind, records, bom, crlf, ascii_only = spec
    path = directory / f"{name}.{kind}"
    if kind == "parquet":  # one type per column: strings or nulls (Arrow strings cannot hold lone surrogates)
        clean = lambda v: v.encode("utf-8", "replace").decode() if isinstance(v, str) else None  # noqa: E731
        rows = [{k: clean(r.get(k)) for k in ("prompt", "chosen", "rejected")} for r in records if isinstance(r, dict)]
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(k, pa.string()) for k in
                                                                    ("prompt", "chosen", "rejected")])), path)
        return DataFile(path, len(rows))
    end = b"\r\n" if crlf else b"\n"
    lines = [r if isinstance(r, bytes) else _json_line(r, ascii_only) for r in records]
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(line + end for line in lines)
    path.write_bytes(gzip.compress(data, mtime=0) if kind.endswith(".gz") else data)
    if kind.endswith(".gz") and damage:  # cut the compressed stream: the rows before the cut are kept, the
        whole = gzip.compress(data, mtime=0)  # rest is one quarantined row (data.on_damaged_file=quarantine)
        path.write_bytes(whole[:max(10, len(whole) * damage // 4)])
        complete = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(path.read_bytes()).count(b"\n")
        return DataFile(path, complete + 1)
    return DataFile(path, len(lines))


@st.composite
def data_files(draw) -> dict:
    """{"train": spec, "eval": spec | None, "overrides": [...]}: files are written by `materialize`."""
    overrides = [f"data.max_chars={MAX_CHARS}", f"data.max_length={MAX_LENGTH}",
                 f"data.max_prompt_length={MAX_LENGTH // 2}",
                 f"data.drop_identical_pairs={str(draw(st.booleans())).lower()}"]
    for key in ("max_train_pairs", "max_eval_pairs"):
        limit = draw(st.one_of(st.none(), st.integers(0 if key == "max_eval_pairs" else MIN_VALID, 20)))
        overrides.append(f"data.{key}={'null' if limit is None else limit}")
    eval_spec = draw(st.one_of(st.none(), file_spec(0)))
    if eval_spec is None:
        overrides.append(f"data.eval_fraction={draw(st.sampled_from([0.0, 0.2, 0.5]))}")
    damage = draw(st.integers(0, 3)) if eval_spec else 0
    if damage:
        overrides.append("data.on_damaged_file=quarantine")
    return {"train": draw(file_spec(MIN_VALID * 2)), "eval": eval_spec, "damage": damage, "overrides": overrides}


def materialize(example: dict, directory: Path) -> tuple[list[str], int, list[DataFile]]:
    """Write the files; (config overrides, rows written in all, the files)."""
    files = [write_file(directory, "train", example["train"])]
    overrides = [*example["overrides"], f"data.train_path={files[0].path}"]
    if example["eval"] is not None:
        files.append(write_file(directory, "eval", example["eval"], example["damage"]))
        overrides.append(f"data.eval_path={files[1].path}")
    return overrides, sum(f.rows for f in files), files


def check_accounting(stats: dict, rows_written: int) -> None:
    """Every row read is counted exactly once, and the reader read every row written."""
    assert stats["rows_read"] == rows_written, (stats, rows_written)
    assert (stats["train_pairs"] + stats["eval_pairs"] + stats["quarantined"] + stats["dropped_identical_pairs"]
            + stats["dropped_over_limit"]) == stats["rows_read"], stats


def check_quarantine_file(path: Path, files: list[DataFile]) -> list[tuple]:
    """quarantine.jsonl is valid UTF-8 JSON lines; each names a file of the run, a row >= 1 and a reason."""
    names = {str(f.path) for f in files}
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        assert q["source"] in names and isinstance(q["row"], int) and q["row"] >= 1 and q["reason"].strip(), q
        out.append((q["source"], q["row"], q["reason"]))
    return out


def profile(max_examples: int):
    return settings(max_examples=max_examples, **SETTINGS)
