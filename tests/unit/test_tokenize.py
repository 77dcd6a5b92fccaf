"""orpo_ray.data.tokenize: the truncation policy with hand-written ids, chat rendering, and the map_batches body.

The `tok` fixture (conftest.py) maps each byte to its value: "a" = 97; <s> = 256, </s> = 257.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orpo_ray.data.records import PreferencePair, pair_to_row
from orpo_ray.data.tokenize import FLAG_COLUMNS, QUARANTINE_COLUMNS, TOKEN_COLUMNS, render_pair, tokenize_batch, tokenize_pair, use_chat_template
from transformers import AutoTokenizer

from .conftest import BOS_ID as BOS, EOS_ID as EOS, make_tokenizer

A, B, C, D, E, F = range(97, 103)  # "abcdef"
X, Y, Z = 120, 121, 122  # "xyz"
USER = {"role": "user", "content": "hi"}
GOOD, BAD = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}


# --------------------------------------------------------------------------------------- truncation policy
def test_a_pair_that_fits_is_untouched(tok):
    row = tokenize_pair("ab", "x", "yz", tok, max_length=16, max_prompt_length=8)
    assert row == {"prompt_ids": [BOS, A, B], "chosen_ids": [X, EOS], "rejected_ids": [Y, Z, EOS],
                   "prompt_tokens_cut": 0, "response_tokens_cut": 0}


def test_a_long_prompt_keeps_its_end_with_bos_first(tok):
    # BOS a b c d e f (7) + "x" EOS (2) > 8: the prompt is cut to 4 tokens = BOS + "def"
    row = tokenize_pair("abcdef", "x", "y", tok, max_length=8, max_prompt_length=4)
    assert row["prompt_ids"] == [BOS, D, E, F] and row["prompt_tokens_cut"] == 3
    assert row["chosen_ids"] == [X, EOS] and row["rejected_ids"] == [Y, EOS] and row["response_tokens_cut"] == 0


def test_a_prompt_longer_than_its_budget_stays_whole_when_the_pair_fits(tok):
    row = tokenize_pair("abcdef", "x", "y", tok, max_length=16, max_prompt_length=4)
    assert row["prompt_ids"] == [BOS, A, B, C, D, E, F] and row["prompt_tokens_cut"] == 0


def test_responses_are_right_truncated_to_what_the_prompt_leaves(tok):
    # BOS a b (3) + 5 chosen tokens > 6: 3 tokens left for each response
    row = tokenize_pair("ab", "xyzx", "y", tok, max_length=6, max_prompt_length=4)
    assert row["prompt_ids"] == [BOS, A, B]
    assert row["chosen_ids"] == [X, Y, Z] and row["rejected_ids"] == [Y, EOS]
    assert (row["prompt_tokens_cut"], row["response_tokens_cut"]) == (0, 2)  # "x" and EOS of chosen


def test_both_cuts_at_once_are_counted(tok):
    # prompt BOS+6 -> BOS+"ef" (3 cut); budget 2: chosen "xyz"EOS -> "xy" (2 cut), rejected "xyzxy"EOS -> "xy" (4 cut)
    row = tokenize_pair("abcdef", "xyz", "xyzxy", tok, max_length=5, max_prompt_length=3)
    assert row["prompt_ids"] == [BOS, E, F] and row["chosen_ids"] == [X, Y] and row["rejected_ids"] == [X, Y]
    assert (row["prompt_tokens_cut"], row["response_tokens_cut"]) == (4, 6)


def test_a_prompt_that_alone_fills_max_length_still_leaves_a_response_token(tok):
    row = tokenize_pair("a" * 100, "xyz", "y", tok, max_length=10, max_prompt_length=9)
    assert row["prompt_ids"] == [BOS] + [A] * 8
    assert row["chosen_ids"] == [X] and row["rejected_ids"] == [Y]
    assert (row["prompt_tokens_cut"], row["response_tokens_cut"]) == (92, 4)


def test_without_bos_the_prompt_end_is_kept_as_is(tok_no_bos):
    row = tokenize_pair("abcdef", "x", "y", tok_no_bos, max_length=5, max_prompt_length=3)
    assert row["prompt_ids"] == [D, E, F] and row["prompt_tokens_cut"] == 3 and row["chosen_ids"] == [X, EOS]


def test_a_rendered_bos_is_not_doubled(tok):
    assert tokenize_pair("<s>ab", "x", "y", tok, 16, 8)["prompt_ids"] == [BOS, A, B]


@pytest.mark.parametrize("max_prompt_length", [10, 11, 0])
def test_prompt_budget_must_be_positive_and_below_max_length(tok, max_prompt_length):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pair("a", "b", "c", tok, max_length=10, max_prompt_length=max_prompt_length)


def test_policy_invariants_over_many_lengths(tok):
    """Every combination: >= 1 token per response, within max_length, and cuts add up to what was removed."""
    for p, c, r, mpl in itertools.product((0, 1, 5, 12), (0, 1, 7), (0, 3, 15), (1, 4, 9)):
        row = tokenize_pair("a" * p, "x" * c, "y" * r, tok, max_length=10, max_prompt_length=mpl)
        kept_p, kept_c, kept_r = (len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        assert kept_c >= 1 and kept_r >= 1 and kept_p + max(kept_c, kept_r) <= 10
        assert row["prompt_ids"][0] == BOS
        assert row["prompt_tokens_cut"] == 1 + p - kept_p
        assert row["response_tokens_cut"] == (c + 1 - kept_c) + (r + 1 - kept_r)


# --------------------------------------------------------------------------------------------- rendering
def test_string_pairs_pass_through(tok):
    assert render_pair(PreferencePair("p", " c", " r", "f", 1), tok) == ("p", " c", " r")


def test_conversational_pairs_use_the_chat_template(tok):
    prompt, chosen, rejected = render_pair(PreferencePair([USER], [GOOD], [BAD], "f", 1), tok)
    assert (prompt, chosen, rejected) == ("<user>hi\n<assistant>", "good\n", "bad\n")


def test_a_template_that_does_not_extend_the_prompt_is_an_error():
    # the generation prompt "<reply>" differs from how the assistant turn is rendered
    tok = make_tokenizer(chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                       "{% if add_generation_prompt %}<reply>{% endif %}")
    with pytest.raises(ValueError, match="prefix"):
        render_pair(PreferencePair([USER], [GOOD], [BAD], "f.jsonl", 4), tok)


def test_conversational_data_needs_a_chat_template(tmp_path):
    """The error names the tokenizer's directory and the key that fixes it."""
    make_tokenizer(chat_template=None).save_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=rf"f row 1: .*tokenizer at {tmp_path / 'model'} has none; set data.chat_template"):
        render_pair(PreferencePair([USER], [GOOD], [BAD], "f", 1), tok)


def test_data_chat_template_a_built_in_name_or_a_file(tmp_path):
    pair = PreferencePair([USER], [GOOD], [BAD], "f", 1)
    tok = use_chat_template(make_tokenizer(chat_template=None), "chatml")
    assert render_pair(pair, tok) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                                      "good<|im_end|>\n", "bad<|im_end|>\n")
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                                      "{% if add_generation_prompt %}{% endif %}")
    tok = use_chat_template(make_tokenizer(), str(tmp_path / "t.jinja"))  # overrides the tokenizer's own
    assert render_pair(pair, tok) == ("[hi]", "[good]", "[bad]")
    with pytest.raises(ValueError, match="data.chat_template='nope' is neither a file nor a built-in"):
        use_chat_template(tok, "nope")


# --------------------------------------------------------------------------------------- map_batches body
def test_tokenize_batch_on_ray_style_numpy_columns(tok):
    pairs = [PreferencePair("ab", "x", "y", "f", 1), PreferencePair([USER], [GOOD], [BAD], "g", 2)]
    rows = [pair_to_row(p) for p in pairs]
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}  # what batch_format="numpy" hands over
    out = tokenize_batch(batch, tok, max_length=32, max_prompt_length=16, keep=("source", "row"))
    assert set(out) == {*TOKEN_COLUMNS, *FLAG_COLUMNS, *QUARANTINE_COLUMNS, "source", "row"}
    assert list(out["reason"]) == ["", ""]
    assert out["prompt_ids"][0] == [BOS, A, B] and out["chosen_ids"][0] == [X, EOS]
    expected = tokenize_pair(*render_pair(pairs[1], tok), tok, 32, 16)
    assert {k: out[k][1] for k in TOKEN_COLUMNS} == expected
    assert list(out["source"]) == ["f", "g"] and list(out["row"]) == [1, 2]


def test_tokenize_batch_marks_a_row_that_fails_and_keeps_one_dtype(tok_no_bos):
    pairs = [PreferencePair("", "x", "y", "f", 1), PreferencePair("ab", "x", "y", "f", 2)]
    rows = [pair_to_row(p) for p in pairs]
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out = tokenize_batch(batch, tok_no_bos, max_length=32, max_prompt_length=16, keep=("row",))
    assert out["reason"][0].startswith("empty prompt") and out["reason"][1] == ""
    assert out["prompt_ids"][0] == [0] and out["identical"][0] is False  # placeholder, never kept by the policy


def test_conversational_pairs_with_the_projects_tokenizer():
    """build_byte_tokenizer's template renders HH-style turns; BOS once at the start, EOS ends each response."""
    from orpo_ray.embedded_tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    pair = PreferencePair([USER], [GOOD], [BAD], "f", 1)
    prompt, chosen, rejected = render_pair(pair, tok)
    assert (prompt, chosen, rejected) == ("\n\nHuman: hi\n\nAssistant:", " good", " bad")
    row = tokenize_pair(prompt, chosen, rejected, tok, max_length=64, max_prompt_length=32)
    assert row["prompt_ids"][0] == tok.bos_token_id and row["prompt_ids"].count(tok.bos_token_id) == 1
    assert tok.decode(row["prompt_ids"][1:]) == prompt
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["chosen_ids"][:-1]) == " good" and tok.decode(row["rejected_ids"][:-1]) == " bad"
