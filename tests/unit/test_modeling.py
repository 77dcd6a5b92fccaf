"""The embedded default builds without downloads; a local HF directory loads through from_pretrained."""

import pytest
import torch

from orpo_ray.config import load_config
from orpo_ray.modeling import load_model_and_tokenizer
from orpo_ray.embedded_tokenizer import build_byte_tokenizer, train_bpe_tokenizer


def _tiny_cfg(*extra):
    return load_config(None, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
                              "model.tiny.num_hidden_layers=1", *extra]).model


def test_tiny_model_is_deterministic_and_sized_to_tokenizer():
    m1, tok = load_model_and_tokenizer(_tiny_cfg())
    m2, _ = load_model_and_tokenizer(_tiny_cfg())
    assert m1.get_input_embeddings().num_embeddings == len(tok) == 259
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    m3, _ = load_model_and_tokenizer(_tiny_cfg("model.tiny.init_seed=1"))
    assert not torch.equal(m1.lm_head.weight, m3.lm_head.weight)


def test_building_the_model_does_not_consume_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_model_and_tokenizer(_tiny_cfg())
    assert torch.equal(torch.rand(3), expected)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        load_model_and_tokenizer(_tiny_cfg(f"model.name_or_path={tmp_path / 'absent'}"))


def test_byte_tokenizer_round_trips_any_text():
    tok = build_byte_tokenizer()
    text = "Sort: dbca\nAnswer: ünïcödé ✓ 😀"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_extends_the_prompt():
    tok = build_byte_tokenizer()
    prompt = [{"role": "user", "content": "hi"}]
    rendered_prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "hello"}], tokenize=False)
    assert full.startswith(rendered_prompt) and rendered_prompt.endswith("Assistant:")


def test_bpe_training_learns_merges():
    tok = train_bpe_tokenizer(["the cat sat on the mat"] * 50, vocab_size=280)
    assert 259 < len(tok) <= 280
    assert len(tok.encode("the cat", add_special_tokens=False)) < len("the cat")
