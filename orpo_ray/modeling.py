"""Build the embedded tiny Llama, or load a local Hugging Face model directory.

Nothing here downloads: ``name_or_path: tiny`` initialises a small Llama from ``model.tiny`` with a fixed
seed and the project's byte-level tokenizer; any other value must be a local directory holding
``config.json``, tokenizer files and weights (``local_files_only=True``, ``trust_remote_code=False``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from orpo_ray.config import ModelConfig
from orpo_ray.tokenizer import build_byte_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or (None if cfg.name_or_path == "tiny" else cfg.name_or_path)
    if source is None:
        return build_byte_tokenizer()
    _require_local_dir(source, "tokenizer")
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {source} has no eos_token; ORPO appends EOS to every response")
    if tok.pad_token_id is None:
        # Padding positions are masked out of every loss term, so reusing EOS as PAD is safe.
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads or t.num_attention_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = cfg.attn_implementation
    # Fork the RNG so building the model does not shift the training seed's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.init_seed)
        model = LlamaForCausalLM(config)
    dtype = _DTYPES[cfg.dtype]
    return model.to(torch.float32 if dtype == "auto" else dtype)


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(cfg)
    if cfg.name_or_path == "tiny":
        return build_tiny_model(cfg, tokenizer), tokenizer
    _require_local_dir(cfg.name_or_path, "model")
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path,
        dtype=_DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
        trust_remote_code=False,
    )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"model at {cfg.name_or_path} has {model.get_input_embeddings().num_embeddings} embeddings but its "
            f"tokenizer has {len(tokenizer)} tokens"
        )
    return model, tokenizer


def _require_local_dir(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.{'tokenizer' if what == 'tokenizer' else 'name_or_path'}={path!r}: no such local directory "
            "(orpo-ray loads models only from local directories or builds 'tiny'; nothing is downloaded)"
        )


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def export_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) of model and tokenizer, loadable by plain AutoModelForCausalLM."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
