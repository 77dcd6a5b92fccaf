"""A small real tokenizer for the data/tokenize/collate tests: byte-level, id == byte value.

Token ids equal byte values (b"a" -> 97) and the specials follow (<s> 256, </s> 257, <pad> 258), so expected
ids in the tests can be written by hand. Deliberately independent of orpo_ray/embedded_tokenizer.py (the project's
tokenizer), with its own chat template, so these tests check the data path against any HF tokenizer.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
# Role tags, one message per line; the generation prompt is the assistant tag, so prompt + reply extends it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-character map (what the ByteLevel pre-tokenizer emits), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def make_tokenizer(bos: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                      pad_token="<pad>")
    wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tok_no_bos() -> PreTrainedTokenizerFast:
    return make_tokenizer(bos=False)


@pytest.fixture
def ray_init_calls(monkeypatch) -> list[dict]:
    """A stand-in for ray (importing it takes seconds) for tests of `session.ensure_ray`: the keyword arguments of
    every `ray.init` it makes, on a machine with no Ray instance running and no RAY_ADDRESS."""
    import importlib.util
    import sys
    from types import SimpleNamespace

    from orpo_ray.launch import session

    calls: list[dict] = []
    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kwargs: calls.append(kwargs),
                           util=SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1"),
                           __spec__=importlib.util.find_spec("ray"))  # where ray is installed (not imported)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(session, "quiet_ray_data", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls
