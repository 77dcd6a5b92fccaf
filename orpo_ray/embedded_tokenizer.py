"""The project's own tokenizer: byte-level, built locally, no hub download.

``build_byte_tokenizer()`` gives a 259-token byte-level tokenizer (256 bytes + <s>, </s>, <pad>): it can
encode any UTF-8 text, needs no training, and is identical on every machine, which is what the embedded
default wants. ``train_bpe_tokenizer(texts, vocab_size)`` learns byte-level BPE merges on a corpus (the
benchmark uses it to get a realistic 8k/32k vocabulary from HH-RLHF text). Both return a
``transformers.PreTrainedTokenizerFast`` that round-trips through ``save_pretrained``/``from_pretrained``.

Pure module: tokenizers + transformers only.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]

# A plain-text chat template in the style of the HH-RLHF transcripts, so conversational data and HH data
# look alike to the model. Rendering prompt + reply must extend the rendered prompt (tokenize.render_pair
# relies on it): the generation prompt is exactly the assistant header.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1_000_000
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _byte_level_pipeline(tok: Tokenizer) -> Tokenizer:
    # add_prefix_space=False: " abc" and "abc" stay distinct, so prompt/response boundaries are exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <s>, </s>, <pad>: deterministic, covers all text, no training."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_alphabet())}
    tok = _byte_level_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `vocab_size` entries (incl. the 256 bytes and 3 specials) learned on `texts`."""
    tok = _byte_level_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)
