"""Issue 16: inputs that used to end a run or lose rows - each one now quarantined per row, or a clear error.

Each test here failed on the code before the fix (checked once by reverting it): lone surrogates crashed the
fast tokenizer, the first row fixed a file's format, a damaged .gz raised a bare EOFError/BadGzipFile and lost the
rows before it, a BOM quarantined row 1, a 10 MB row was tokenized whole, a chat-template error and an empty
prompt without BOS (packed: index -1; padded: first response token silently unscored) went through.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pytest

from orpo_ray.config import ConfigError, load_config
from orpo_ray.data.prepare import prepare_data, save_quarantine
from orpo_ray.data.records import DamagedFileError, PreferencePair, Quarantined, read_pairs
from orpo_ray.data.tokenize import tokenize_row
from orpo_ray.forward.collate import collate_pairs
from orpo_ray.forward.packing import collate_packed
from tests.unit.conftest import make_tokenizer

PAIR = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
HH = {"chosen": "\n\nHuman: hi\n\nAssistant: good", "rejected": "\n\nHuman: hi\n\nAssistant: bad"}
TOK = make_tokenizer()


def jsonl(path: Path, rows: list, opener=open) -> Path:
    """Rows as lines; a str row is written verbatim (JSON with escapes such as \\ud800, or broken lines)."""
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", *overrides])


def pairs_and_reasons(path: Path, **kw) -> tuple[list[int], list[tuple[int, str]]]:
    pairs, quarantined = read_pairs(path, **kw)
    return [p.row for p in pairs], [(q.row, q.reason) for q in quarantined]


# ---------------------------------------------------------------------------------- per-row decisions
def test_format_is_detected_per_row_so_a_file_may_mix_shapes(tmp_path):
    conv = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    path = jsonl(tmp_path / "mixed.jsonl", [HH, PAIR, conv, PAIR])
    assert pairs_and_reasons(path) == ([1, 2, 3, 4], [])


def test_data_format_forces_one_format(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [HH, PAIR])
    assert pairs_and_reasons(path, fmt="pairs") == ([2], [(1, "missing field 'prompt'")])
    with pytest.raises(ConfigError, match="data.format must be one of"):
        cfg_for(tmp_path, "data.format=jsonl")


def test_a_lone_surrogate_is_quarantined_before_the_tokenizer_sees_it(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", ['{"prompt": "q", "chosen": "c\\ud800", "rejected": "r"}', PAIR])
    assert pairs_and_reasons(path) == ([2], [(1, "field 'chosen' holds a lone surrogate (not valid Unicode text)")])
    cfg = cfg_for(tmp_path, f"data.train_path={path}", f"data.eval_path={path}")
    prepared = prepare_data(cfg, TOK)  # the fast tokenizer raised TypeError on this row before
    assert prepared.stats["quarantined"] == 2 and len(prepared.train_rows) == 1
    lines = save_quarantine(prepared, tmp_path).read_text(encoding="utf-8").splitlines()  # valid UTF-8 on disk
    assert json.loads(lines[0])["row"] == 1 and "\\ud800" in json.loads(lines[0])["excerpt"]


def test_json_nested_deeper_than_the_decoder_recurses_is_quarantined(tmp_path):
    path = jsonl(tmp_path / "deep.jsonl", ['{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", PAIR])
    assert pairs_and_reasons(path) == ([2], [(1, "invalid JSON: nested too deeply to decode")])  # was RecursionError


def test_a_utf8_bom_does_not_quarantine_row_1(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\r\n" + json.dumps(PAIR).encode() + b"\r\n")
    assert pairs_and_reasons(path) == ([1, 2], [])


def test_a_row_over_max_chars_is_quarantined_with_its_length_before_tokenization(tmp_path):
    huge = {"prompt": "q", "chosen": "x" * 10_000_000, "rejected": "r"}
    path = jsonl(tmp_path / "big.jsonl", [huge, PAIR])
    assert pairs_and_reasons(path) == ([2], [(1, "row has 10,000,002 characters of text, over data.max_chars "
                                                "(1,000,000)")])
    assert pairs_and_reasons(path, max_chars=20_000_000) == ([1, 2], [])


class SpyTokenizer:
    """Delegates to the test tokenizer and records the longest text it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def encode(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_tokenizer_never_sees_a_row_over_max_chars(tmp_path):
    path = jsonl(tmp_path / "big.jsonl", [{"prompt": "q", "chosen": "x" * 5000, "rejected": "r"}, PAIR])
    spy = SpyTokenizer(TOK)
    prepared = prepare_data(cfg_for(tmp_path, f"data.train_path={path}", f"data.eval_path={path}",
                                    "data.max_chars=1000"), spy)
    assert spy.longest < 1000 and prepared.stats["quarantined_by_reason"] == {
        "row has 5,002 characters of text, over data.max_chars (1,000)": 2}


def test_a_chat_template_error_quarantines_its_row_only(tmp_path):
    tok = make_tokenizer(chat_template="{% for m in messages %}{% if m['content'] == 'boom' %}"
                                       "{{ raise_exception('no boom here') }}{% endif %}<{{ m['role'] }}>"
                                       "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    good = PreferencePair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                          [{"role": "assistant", "content": "b"}], "f", 1)
    bad = PreferencePair([{"role": "user", "content": "boom"}], good.chosen, good.rejected, "f", 2)
    assert not isinstance(tokenize_row(good, tok, 64, 32), Quarantined)
    q = tokenize_row(bad, tok, 64, 32)
    assert isinstance(q, Quarantined) and (q.source, q.row) == ("f", 2)
    assert q.reason.startswith("tokenization failed: ") and "no boom here" in q.reason and "boom" in q.excerpt


def test_a_tokenizer_error_on_one_row_quarantines_that_row(tmp_path):
    class Fussy(SpyTokenizer):
        def encode(self, text, **kw):
            if "poison" in text:
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
            return self.inner.encode(text, **kw)

    path = jsonl(tmp_path / "d.jsonl", [PAIR, {**PAIR, "chosen": "poison"}, PAIR])
    prepared = prepare_data(cfg_for(tmp_path, f"data.train_path={path}", f"data.eval_path={path}"), Fussy(TOK))
    assert [r["row"] for r in prepared.train_rows] == [1, 3]
    assert prepared.stats["quarantined_by_reason"] == {
        "tokenization failed: TypeError: TextEncodeInput must be Union[TextInputSequence, ...]": 2}


# ------------------------------------------------------------------------------ empty prompt, no BOS
def test_an_empty_prompt_without_bos_is_quarantined(tok_no_bos, tok):
    pair = PreferencePair("", " yes", " no", "f", 4)
    q = tokenize_row(pair, tok_no_bos, 32, 16)
    assert isinstance(q, Quarantined) and q.row == 4 and "empty prompt" in q.reason and "BOS" in q.reason
    assert tokenize_row(pair, tok, 32, 16)["prompt_ids"] == [tok.bos_token_id]  # with BOS the prompt is [BOS]


@pytest.mark.parametrize("collate", [collate_pairs, lambda rows, pad: collate_packed(rows, pad, True, "longest"),
                                     lambda rows, pad: collate_packed(rows, pad, False, None)],
                         ids=["padded", "packed-prefix-sharing", "unpacked-segments"])
def test_every_layout_refuses_a_row_without_prompt_tokens(collate):
    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 2]},
            {"prompt_ids": [], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}]
    with pytest.raises(ValueError, match="prompt token"):
        collate(rows, 0)


# ------------------------------------------------------------------------------------ damaged files
def gz_rows(path: Path, n: int) -> bytes:
    data = "".join(json.dumps({**PAIR, "prompt": f"Q{i}?"}) + "\n" for i in range(n)).encode()
    path.write_bytes(gzip.compress(data, mtime=0))
    return data


def complete_lines_before(compressed: bytes) -> int:
    """Lines a truncated gzip stream still yields in full, found independently with zlib."""
    out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(compressed)
    return out.count(b"\n")


def test_a_truncated_gz_keeps_the_rows_before_the_damage_or_stops_naming_file_row_and_byte(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    gz_rows(path, 400)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    kept = complete_lines_before(path.read_bytes())
    assert 0 < kept < 400
    with pytest.raises(DamagedFileError, match=rf"cut\.jsonl\.gz: damaged at row {kept + 1} \(decompressed byte "
                                               rf"[\d,]+\).*EOFError.*data\.on_damaged_file=quarantine"):
        read_pairs(path)
    pairs, quarantined = read_pairs(path, on_damaged="quarantine")
    assert [p.row for p in pairs] == list(range(1, kept + 1))
    (q,) = quarantined
    assert q.row == kept + 1 and q.reason.startswith("damaged file: unreadable from here on")


def test_a_file_named_gz_that_is_not_gzip(tmp_path):
    path = jsonl(tmp_path / "plain.jsonl.gz", [PAIR])
    with pytest.raises(DamagedFileError, match=r"plain\.jsonl\.gz: damaged at row 1 \(decompressed byte 0\).*"
                                               r"BadGzipFile"):
        read_pairs(path)
    assert pairs_and_reasons(path, on_damaged="quarantine")[1][0][0] == 1


def test_a_damaged_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([PAIR] * 10), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DamagedFileError, match=r"d\.parquet: damaged at row 1"):
        read_pairs(path)
    assert pairs_and_reasons(path, on_damaged="quarantine")[0] == []


def test_on_damaged_file_is_a_checked_config_key(tmp_path):
    assert cfg_for(tmp_path).data.on_damaged_file == "error"
    with pytest.raises(ConfigError, match="data.on_damaged_file must be one of"):
        cfg_for(tmp_path, "data.on_damaged_file=skip")


def test_a_damaged_eval_file_under_quarantine_is_counted_and_the_run_data_is_ready(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [PAIR, PAIR])
    evalp = tmp_path / "e.jsonl.gz"
    evalp.write_bytes(b"not gzip at all")
    cfg = cfg_for(tmp_path, f"data.train_path={train}", f"data.eval_path={evalp}", "data.on_damaged_file=quarantine")
    stats = prepare_data(cfg, TOK).stats
    assert (stats["train_pairs"], stats["eval_pairs"], stats["quarantined"], stats["rows_read"]) == (2, 0, 1, 3)


# -------------------------------------------------------------------------------------- accounting
def test_every_row_read_is_counted_once(tmp_path):
    rows = [PAIR, {**PAIR, "rejected": " yes"}, "{broken", {**PAIR, "chosen": ""}, PAIR, PAIR, PAIR]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = cfg_for(tmp_path, f"data.train_path={path}", f"data.eval_path={path}", "data.max_train_pairs=3",
                  "data.drop_identical_pairs=true")
    s = prepare_data(cfg, TOK).stats
    assert s["rows_read"] == 14 and s["dropped_over_limit"] == 2  # train: rows 6, 7 over the limit of 3
    assert (s["train_pairs"], s["eval_pairs"], s["quarantined"], s["dropped_identical_pairs"]) == (2, 4, 4, 2)
    assert s["train_pairs"] + s["eval_pairs"] + s["quarantined"] + s["dropped_identical_pairs"] \
        + s["dropped_over_limit"] == s["rows_read"]


def test_an_empty_eval_set_is_data_not_an_error(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [PAIR] * 4)
    for override in ("data.eval_fraction=0", "data.max_eval_pairs=0"):
        prepared = prepare_data(cfg_for(tmp_path, f"data.train_path={path}", override), TOK)
        assert prepared.eval_rows == [] and prepared.stats["eval_pairs"] == 0


def test_evaluate_without_eval_rows_returns_no_metrics(tmp_path):
    from orpo_ray.modeling import load_model_and_tokenizer
    from orpo_ray.train.evaluation import evaluate
    from orpo_ray.train.runtime import LocalRuntime

    path = jsonl(tmp_path / "d.jsonl", [PAIR] * 4)
    cfg = load_config("configs/demo.yaml", [f"output_dir={tmp_path / 'out'}", f"data.train_path={path}",
                                            "data.eval_fraction=0", "model.tiny.hidden_size=16",
                                            "model.tiny.intermediate_size=16", "model.tiny.num_hidden_layers=1"])
    runtime = LocalRuntime(cfg)
    model, tok = load_model_and_tokenizer(cfg.model)
    runtime.setup_data(cfg, tok)
    assert evaluate(model, runtime, cfg, "fp32", tok.pad_token_id) == {}  # was KeyError 'nll_loss'


# ------------------------------------------------------------------------------- paths that are not there
def test_the_cli_names_a_missing_data_file_in_one_line_without_a_traceback(tmp_path, capsys):
    from orpo_ray.cli import main

    missing = tmp_path / "nowhere" / "pairs.jsonl"
    assert main(["train", "configs/demo.yaml", "--local", f"output_dir={tmp_path / 'out'}",
                 f"data.train_path={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"orpo-ray: input error: preference data file not found: {missing}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_cli_names_a_damaged_data_file_in_one_line(tmp_path, capsys):
    from orpo_ray.cli import main

    path = tmp_path / "plain.jsonl.gz"
    path.write_text(json.dumps(PAIR) + "\n")  # named .gz, not gzip
    assert main(["train", "configs/demo.yaml", "--local", f"output_dir={tmp_path / 'out'}",
                 f"data.train_path={path}"]) == 2
    err = capsys.readouterr().err
    assert f"orpo-ray: input error: {path}: damaged at row 1" in err and "Traceback" not in err


@pytest.mark.parametrize("files", [{}, {"tokenizer.json": "{not json"}], ids=["no-files", "broken-tokenizer-json"])
@pytest.mark.parametrize("key", ["name_or_path", "tokenizer"])
def test_a_directory_without_a_usable_tokenizer_names_the_key_and_the_fix(tmp_path, files, key):
    from orpo_ray.tokenizer import TOKENIZER_FILES, load_tokenizer

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name, text in files.items():
        (model_dir / name).write_text(text)
    cfg = cfg_for(tmp_path, f"model.{key}={model_dir}").model
    with pytest.raises(ConfigError) as info:
        load_tokenizer(cfg)
    message = str(info.value)
    assert message.startswith(f"model.{key}='{model_dir}': no tokenizer could be loaded from this directory")
    assert "tokenizer.save_pretrained" in message and "model.tokenizer" in message
    if files:
        assert "tokenizer.json found; transformers: " in message
    else:
        assert f"it has none of {', '.join(TOKENIZER_FILES)}" in message
