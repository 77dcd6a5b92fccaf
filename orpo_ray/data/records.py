"""Preference data: rows in three formats -> PreferencePair, or Quarantined with a reason.

Formats (fmt="auto": the first well-formed record fixes the format of its file; a later record of another
shape is quarantined, and a malformed record before it is quarantined with the reason of its closest format):
  pairs           {"prompt": str, "chosen": str, "rejected": str}
  conversational  chosen/rejected (and optionally prompt) are lists of {"role", "content"} messages;
                  without a prompt, the messages chosen and rejected share at the start are the prompt
  hh              Anthropic HH-RLHF: {"chosen": transcript, "rejected": transcript}; the prompt is the
                  text up to and including the last "\\n\\nAssistant:", the response is the rest

A row that cannot be made valid never crashes a run and is never silently dropped: it becomes a
`Quarantined(source, row, reason, excerpt)` that callers count and write to quarantine.jsonl.
Rows are numbered from 1 (the line number in JSONL files, blank lines counted but skipped; the row position in
Parquet files and `datasets` save_to_disk directories, see hf.py). A whole file that cannot be read (missing,
unknown extension, a .json that is not a JSON list) raises, naming the file.

Pure module: no ray, no deepspeed.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

Messages = list  # list[dict[str, str]]
Text = Union[str, Messages]

HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("pairs", "conversational", "hh")
EXCERPT_CHARS = 200


@dataclass(frozen=True)
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    source: str
    row: int


@dataclass(frozen=True)
class Quarantined:
    source: str
    row: int
    reason: str
    excerpt: str


def _excerpt(raw: Any) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text[:EXCERPT_CHARS]


# ---------------------------------------------------------------------------------------------- reading
def iter_records(path: str | Path) -> Iterator[tuple[int, dict | Quarantined]]:
    """(row number, record) for every row; undecodable rows come back as Quarantined, never raise."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data file not found: {source}")
    name = path.name.lower()
    if path.is_dir():  # a `datasets` save_to_disk directory, read shard by shard from its Arrow files
        from orpo_ray.data.hf import iter_saved_dataset

        yield from iter_saved_dataset(path)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for row, raw in enumerate(f, start=1):
                if raw.strip():
                    yield row, _decode_json_line(raw, source, row)
    elif name.endswith(".json"):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: not a JSON list of records ({e}); use JSONL for row-level quarantine") from None
        if not isinstance(records, list):
            raise ValueError(f"{source}: a .json file must hold a list of records")
        for row, record in enumerate(records, start=1):
            yield row, record if isinstance(record, dict) else Quarantined(
                source, row, f"row is {type(record).__name__}, expected a JSON object", _excerpt(record))
    else:
        raise ValueError(f"{source}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .parquet or a "
                         "directory written by datasets' save_to_disk)")


def _decode_json_line(raw: bytes, source: str, row: int) -> dict | Quarantined:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Quarantined(source, row, f"not valid UTF-8 ({e.reason} at byte {e.start})",
                           raw[:EXCERPT_CHARS].decode("utf-8", "replace"))
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Quarantined(source, row, f"invalid JSON: {e.msg} (column {e.colno})", text[:EXCERPT_CHARS])
    if not isinstance(record, dict):
        return Quarantined(source, row, f"row is {type(record).__name__}, expected a JSON object", text[:EXCERPT_CHARS])
    return record


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


# ---------------------------------------------------------------------------------------------- parsing
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def detect_format(record: dict) -> str:
    """'pairs' | 'conversational' | 'hh' for a well-formed record; ValueError if the record fits none."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if _is_messages(chosen) and _is_messages(rejected):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" not in record:
            return "hh"
        if isinstance(record["prompt"], str):
            return "pairs"
    raise ValueError(f"record with keys {sorted(record)} matches no known format "
                     "(pairs: prompt/chosen/rejected; conversational: message lists; hh: chosen/rejected transcripts)")


def _closest_format(record: dict) -> str | None:
    """The format a malformed record was most likely meant to be, so its quarantine reason can be specific
    ("field 'chosen' is int, expected str") rather than "matches no known format". Never fixes a file's format."""
    if any(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected")):
        return "conversational"
    if "prompt" in record:
        return "pairs"
    if "chosen" in record or "rejected" in record:
        return "hh"
    return None


def _require_fields(record: dict, names: tuple[str, ...], kind: type | tuple) -> str | None:
    for name in names:
        if name not in record:
            return f"missing field '{name}'"
        value = record[name]
        if not isinstance(value, kind):
            expected = "str" if kind is str else "list of messages"
            actual = "null" if value is None else type(value).__name__  # Parquet/JSON nulls read as None
            return f"field '{name}' is {actual}, expected {expected}"
    return None


def _split_hh(transcript: str) -> tuple[str, str] | None:
    idx = transcript.rfind(HH_ASSISTANT)
    if idx < 0:
        return None
    cut = idx + len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def parse_record(record: dict, fmt: str, source: str, row: int) -> PreferencePair | Quarantined:
    """One record in a known format -> PreferencePair, or Quarantined naming what is wrong."""
    q = lambda reason: Quarantined(source, row, reason, _excerpt(record))  # noqa: E731
    if fmt == "pairs":
        if err := _require_fields(record, ("prompt", "chosen", "rejected"), str):
            return q(err)
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    elif fmt == "hh":
        if err := _require_fields(record, ("chosen", "rejected"), str):
            return q(err)
        c, r = _split_hh(record["chosen"]), _split_hh(record["rejected"])
        if c is None or r is None:
            return q(f"{'chosen' if c is None else 'rejected'} has no '\\n\\nAssistant:' turn")
        if c[0] != r[0]:
            return q("chosen and rejected do not share a prompt")
        prompt, chosen, rejected = c[0], c[1], r[1]
    elif fmt == "conversational":
        if err := _require_fields(record, ("chosen", "rejected"), list):
            return q(err)
        if not (_is_messages(record["chosen"]) and _is_messages(record["rejected"])):
            return q("chosen/rejected must be lists of {role, content} messages")
        if "prompt" in record:
            prompt = record["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if not _is_messages(prompt):
                return q("field 'prompt' is neither a string nor a list of messages")
            chosen, rejected = record["chosen"], record["rejected"]
        else:
            shared = 0
            while (shared < min(len(record["chosen"]), len(record["rejected"])) - 1
                   and record["chosen"][shared] == record["rejected"][shared]):
                shared += 1
            prompt = record["chosen"][:shared]
            chosen, rejected = record["chosen"][shared:], record["rejected"][shared:]
            if not prompt:
                return q("chosen and rejected share no leading messages to use as the prompt")
        if any(m.get("role") != "assistant" for m in chosen + rejected):
            return q("responses must be assistant messages")
        if any(not isinstance(m.get("content"), str) for m in prompt + chosen + rejected):
            return q("message content must be a string")
    else:
        raise ValueError(f"unknown data format {fmt!r} (expected one of {FORMATS})")

    for name, value in (("chosen", chosen), ("rejected", rejected)):
        text = value if isinstance(value, str) else "".join(m["content"] for m in value)
        if not text.strip():
            return q(f"empty {name} response")
    return PreferencePair(prompt, chosen, rejected, source, row)


def iter_parsed(path: str | Path, fmt: str = "auto") -> Iterator[PreferencePair | Quarantined]:
    """Every row of a file as a PreferencePair or Quarantined; `auto` detects from the first valid record."""
    source = str(path)
    for row, record in iter_records(path):
        if isinstance(record, Quarantined):
            yield record
            continue
        if fmt == "auto":
            try:
                fmt = detect_format(record)  # the first well-formed record fixes the file's format
            except ValueError as e:
                guess = _closest_format(record)
                yield parse_record(record, guess, source, row) if guess else Quarantined(
                    source, row, str(e), _excerpt(record))
                continue
        yield parse_record(record, fmt, source, row)


def read_pairs(path: str | Path, fmt: str = "auto") -> tuple[list[PreferencePair], list[Quarantined]]:
    """All rows of one file, split into valid pairs and quarantined rows (both in file order)."""
    pairs, quarantined = [], []
    for item in iter_parsed(path, fmt):
        (quarantined if isinstance(item, Quarantined) else pairs).append(item)
    return pairs, quarantined


def write_quarantine(path: str | Path, items: list[Quarantined]) -> Path:
    """One JSON object per line: {source, row, reason, excerpt}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------- flat rows for Ray Data
def pair_to_row(pair: PreferencePair) -> dict:
    """Flat string columns (message lists JSON-encoded) so Arrow gets one schema for every format."""
    enc = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)  # noqa: E731
    return {"prompt": enc(pair.prompt), "chosen": enc(pair.chosen), "rejected": enc(pair.rejected),
            "conversational": not isinstance(pair.chosen, str), "source": pair.source, "row": pair.row}


def row_to_pair(row: Mapping[str, Any]) -> PreferencePair:
    """Inverse of `pair_to_row`; tolerates Ray's numpy scalars (np.str_, np.bool_, np.int64)."""
    dec = json.loads if bool(row.get("conversational", False)) else str
    return PreferencePair(dec(row["prompt"]), dec(row["chosen"]), dec(row["rejected"]), str(row.get("source", "")),
                          int(row.get("row", 0)))
