"""Preference data: rows in three formats -> PreferencePair, or Quarantined with a reason.

Formats (fmt="auto": each record's own shape decides its format, so a file may mix them; a malformed record is
quarantined with the reason of its closest format; data.format forces one format for every row):
  pairs           {"prompt": str, "chosen": str, "rejected": str}
  conversational  chosen/rejected (and optionally prompt) are lists of {"role", "content"} messages;
                  without a prompt, the messages chosen and rejected share at the start are the prompt
  hh              Anthropic HH-RLHF: {"chosen": transcript, "rejected": transcript}; the prompt is the
                  text up to and including the last "\\n\\nAssistant:", the response is the rest

A row that cannot be made valid never crashes a run and is never silently dropped: it becomes a
`Quarantined(source, row, reason, excerpt)` that callers count and write to quarantine.jsonl. That covers
invalid UTF-8 or JSON, a UTF-8 BOM (ignored at the start of a line), text with a lone surrogate (valid JSON,
but no tokenizer or Arrow column takes it) and a row over data.max_chars characters (quarantined before any
tokenization, so one huge row cannot stall a run).
Rows are numbered from 1 (the line number in JSONL files, blank lines counted but skipped; the row position in
Parquet files and `datasets` save_to_disk directories, see hf.py). A whole file that cannot be read (missing,
unknown extension, a .json that is not a JSON list) raises, naming the file. A damaged compressed or Parquet
file (truncated, or not what its name says) yields every row read before the damage, then either raises
`DamagedFileError` naming the file, row and byte (on_damaged="error") or ends with one Quarantined row for the
unreadable rest (on_damaged="quarantine").

Pure module: no ray, no deepspeed.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

Messages = list  # list[dict[str, str]]
Text = Union[str, Messages]

HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("pairs", "conversational", "hh")
EXCERPT_CHARS = 200
REASON_CHARS = 500  # a reason may quote keys or an exception; bounded so one odd row cannot bloat the report
DEFAULT_MAX_CHARS = 1_000_000  # data.max_chars
DAMAGED = ("error", "quarantine")
BOM = "\ufeff".encode()
LINE_BREAKS = ("\u2028", "\u2029", "\x85")  # the line breaks json.dumps leaves unescaped


class DamagedFileError(ValueError):
    """A compressed or Parquet file breaks off (truncated, or not the format its name says)."""


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

    def __post_init__(self) -> None:
        # Lone surrogates (the reason a row is quarantined, sometimes) must not reach quarantine.jsonl or an
        # Arrow column, both UTF-8 only: they are written as \udXXX escapes.
        object.__setattr__(self, "reason", printable(self.reason)[:REASON_CHARS])
        object.__setattr__(self, "excerpt", printable(self.excerpt)[:EXCERPT_CHARS])
        object.__setattr__(self, "source", printable(self.source))


def printable(text: str) -> str:
    """`text` with every lone surrogate replaced by its backslash escape, so it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def excerpt(raw: Any) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return text[:EXCERPT_CHARS]


# ---------------------------------------------------------------------------------------------- reading
def iter_records(path: str | Path, on_damaged: str = "error") -> Iterator[tuple[int, dict | Quarantined]]:
    """(row number, record) for every row; undecodable rows come back as Quarantined, never raise."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data file not found: {source}")
    if on_damaged not in DAMAGED:
        raise ValueError(f"on_damaged must be one of {DAMAGED}, got {on_damaged!r}")
    name = path.name.lower()
    if path.is_dir():  # a `datasets` save_to_disk directory, read shard by shard from its Arrow files
        from orpo_ray.data.hf import iter_saved_dataset

        yield from iter_saved_dataset(path)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path, on_damaged)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        yield from _iter_jsonl(path, name.endswith(".gz"), on_damaged)
    elif name.endswith(".json"):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: not a JSON list of records ({e}); use JSONL for row-level quarantine") from None
        if not isinstance(records, list):
            raise ValueError(f"{source}: a .json file must hold a list of records")
        for row, record in enumerate(records, start=1):
            yield row, record if isinstance(record, dict) else Quarantined(
                source, row, f"row is {type(record).__name__}, expected a JSON object", excerpt(record))
    else:
        raise ValueError(f"{source}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .parquet or a "
                         "directory written by datasets' save_to_disk)")


# What a damaged file raises while being read: gzip (truncated: EOFError; not gzip: BadGzipFile, an OSError;
# corrupt deflate data: zlib.error) and pyarrow (ArrowInvalid / ArrowIOError are ValueError / OSError).
GZIP_ERRORS = (EOFError, OSError, zlib.error)
PARQUET_ERRORS = (OSError, ValueError)


def _iter_jsonl(path: Path, gz: bool, on_damaged: str) -> Iterator[tuple[int, dict | Quarantined]]:
    row = offset = 0  # lines and (decompressed) bytes read so far
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for raw in f:
                row += 1
                offset += len(raw)
                raw = raw.removeprefix(BOM)  # files saved by some editors, or concatenated from such files
                if raw.strip():
                    yield row, _decode_json_line(raw, str(path), row)
    except GZIP_ERRORS as e:
        where = f"{'decompressed ' if gz else ''}byte {offset:,}"
        yield _damaged(str(path), row + 1, where, e, on_damaged)


def _iter_parquet(path: Path, on_damaged: str) -> Iterator[tuple[int, dict | Quarantined]]:
    import pyarrow.parquet as pq

    row = group = 0
    try:
        for group, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=1024)):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except PARQUET_ERRORS as e:
        yield _damaged(str(path), row + 1, f"record batch {group}", e, on_damaged)


def _damaged(source: str, row: int, where: str, error: Exception, on_damaged: str) -> tuple[int, Quarantined]:
    """The rows before `row` were read; the rest of the file cannot be: raise, or one Quarantined for the rest."""
    what = f"damaged at row {row} ({where}): {type(error).__name__}: {error}"
    if on_damaged == "error":
        raise DamagedFileError(f"{source}: {what}; rows 1-{row - 1} were read. Set data.on_damaged_file=quarantine "
                               "to keep them and go on") from None
    return row, Quarantined(source, row, f"damaged file: unreadable from here on ({what})", "")


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
    except RecursionError:  # valid JSON nested thousands deep: the decoder recurses once per level
        return Quarantined(source, row, "invalid JSON: nested too deeply to decode", text[:EXCERPT_CHARS])
    if not isinstance(record, dict):
        return Quarantined(source, row, f"row is {type(record).__name__}, expected a JSON object", text[:EXCERPT_CHARS])
    return record


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


def closest_format(record: dict) -> str | None:
    """The format a malformed record was most likely meant to be, so its quarantine reason can be specific
    ("field 'chosen' is int, expected str") rather than "matches no known format"."""
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
    q = lambda reason: Quarantined(source, row, reason, excerpt(record))  # noqa: E731
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

    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if any(_has_lone_surrogate(t) for t in _texts(value)):
            return q(f"field '{name}' holds a lone surrogate (not valid Unicode text)")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not "".join(_texts(value, roles=False)).strip():
            return q(f"empty {name} response")
    return PreferencePair(prompt, chosen, rejected, source, row)


def _texts(value: Text, roles: bool = True) -> Iterator[str]:
    """The strings of a field: itself, or each message's content (and role)."""
    if isinstance(value, str):
        yield value
        return
    for m in value:
        yield m["content"]
        if roles and isinstance(m.get("role"), str):
            yield m["role"]


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def text_chars(record: Mapping[str, Any]) -> int:
    """Characters of text in a record's prompt/chosen/rejected fields (message contents and roles included)."""
    def size(value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0
    return sum(size(record.get(k)) for k in ("prompt", "chosen", "rejected"))


def parse_row(record: dict, fmt: str, source: str, row: int, max_chars: int = DEFAULT_MAX_CHARS
              ) -> PreferencePair | Quarantined:
    """One decoded record -> PreferencePair or Quarantined; `auto` detects this record's own format."""
    if fmt == "auto":
        try:
            fmt = detect_format(record)
        except ValueError as e:
            fmt = closest_format(record)
            if fmt is None:
                return Quarantined(source, row, str(e), excerpt(record))
    if (chars := text_chars(record)) > max_chars:  # before any string work on it, tokenization above all
        return Quarantined(source, row, f"row has {chars:,} characters of text, over data.max_chars ({max_chars:,})",
                           excerpt(record))
    return parse_record(record, fmt, source, row)


def iter_parsed(path: str | Path, fmt: str = "auto", max_chars: int = DEFAULT_MAX_CHARS,
                on_damaged: str = "error") -> Iterator[PreferencePair | Quarantined]:
    """Every row of a file as a PreferencePair or Quarantined (see the module docstring)."""
    for row, record in iter_records(path, on_damaged):
        yield record if isinstance(record, Quarantined) else parse_row(record, fmt, str(path), row, max_chars)


def read_pairs(path: str | Path, fmt: str = "auto", max_chars: int = DEFAULT_MAX_CHARS,
               on_damaged: str = "error") -> tuple[list[PreferencePair], list[Quarantined]]:
    """All rows of one file, split into valid pairs and quarantined rows (both in file order)."""
    pairs, quarantined = [], []
    for item in iter_parsed(path, fmt, max_chars, on_damaged):
        (quarantined if isinstance(item, Quarantined) else pairs).append(item)
    return pairs, quarantined


def write_quarantine(path: str | Path, items: list[Quarantined]) -> Path:
    """One JSON object per line: {source, row, reason, excerpt}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            line = json.dumps(asdict(item), ensure_ascii=False)
            for sep in LINE_BREAKS:  # legal raw in JSON strings, but str.splitlines() would break the line there
                line = line.replace(sep, f"\\u{ord(sep):04x}")
            f.write(line + "\n")
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
