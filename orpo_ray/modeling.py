"""Build the embedded tiny Llama, or load a local Hugging Face model directory.

Nothing here downloads: ``name_or_path: tiny`` initialises a small Llama from ``model.tiny`` with a fixed
seed and the project's byte-level tokenizer; any other value must be a local directory holding
``config.json``, tokenizer files and weights (``local_files_only=True``, ``trust_remote_code=False``), or
an adapter directory exported by a LoRA run (``adapter_config.json``; see `load_adapter_model`).

LoRA (``model.lora.enabled``): `apply_lora` wraps the model in a peft ``PeftModel`` whose adapter weights are
the only trainable parameters. ORPO needs no reference model, so this wrapped model is the only one.
`export_model` then writes the adapter (plus the base weights when the base is not a directory on disk, as
for 'tiny'); `export_merged` writes a plain model with the adapters folded in. peft is imported lazily so
full fine-tuning does not pay for it.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from orpo_ray.lean_imports import import_model_code

import_model_code()  # before transformers' model code loads: 110 MB less in every training process

from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from orpo_ray.config import ConfigError, LoraSection, ModelSection
from orpo_ray.tokenizer import load_tokenizer, require_local_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}
ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes next to adapter_model.safetensors
BASE_SUBDIR = "base"  # where an adapter export keeps base weights that exist nowhere else (e.g. 'tiny')


def build_tiny_model(cfg: ModelSection, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
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
    config._attn_implementation = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    # Fork the RNG so building the model does not shift the training seed's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.init_seed)
        model = LlamaForCausalLM(config)
    dtype = _DTYPES[cfg.dtype]
    return model.to(torch.float32 if dtype == "auto" else dtype)


def load_model_and_tokenizer(cfg: ModelSection) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model of `cfg` (LoRA-wrapped when model.lora.enabled) and its tokenizer."""
    tokenizer = load_tokenizer(cfg)
    if cfg.name_or_path == "tiny":
        model = build_tiny_model(cfg, tokenizer)
    else:
        require_local_dir(cfg.name_or_path, "model")
        if is_adapter_dir(cfg.name_or_path):
            if cfg.lora.enabled:
                raise ConfigError(
                    f"model.name_or_path={cfg.name_or_path!r} is a LoRA adapter directory; training new adapters on "
                    "top of it is not supported: export it with export.merge_lora=true and train from the merged dir")
            model = load_adapter_model(cfg.name_or_path, cfg)
        else:
            model = _load_pretrained(cfg.name_or_path, cfg)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(
                f"model at {cfg.name_or_path} has {model.get_input_embeddings().num_embeddings} embeddings but its "
                f"tokenizer has {len(tokenizer)} tokens"
            )
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model, tokenizer


def auto_attn_implementation(path: str | Path) -> str:
    """'sdpa' where the directory's model class supports it, else 'eager' (Gemma 2: sdpa cannot soft-cap).

    flex / flash attention are never picked: flash ignores the packed layouts' 4-D masks, and flex compiles a
    kernel per shape (no gain measured here on CPU); name them in model.attn_implementation to use them."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def resolve_attn_implementation(cfg: ModelSection, path: str | Path | None = None) -> str:
    """model.attn_implementation with 'auto' resolved for the model directory `path` (default name_or_path)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return auto_attn_implementation(path or cfg.name_or_path)


def _load_pretrained(path: str | Path, cfg: ModelSection) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=_DTYPES[cfg.dtype],
        attn_implementation=resolve_attn_implementation(cfg, path),
        local_files_only=True,
        trust_remote_code=False,
    )


# ---------------------------------------------------------------------------------------------- LoRA
def apply_lora(model: torch.nn.Module, lora: LoraSection) -> torch.nn.Module:
    """Wrap `model` in peft LoRA adapters on `lora.target_modules`; only adapter weights stay trainable.

    peft silently skips a target name that matches nothing as long as another one matches, so a typo
    (``q_prj``) would train fewer modules than asked for: every name must match a module here, using peft's
    rule (the full module name, or its dotted suffix).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(repr(m) for m in missing)} matches no module of "
            f"{type(model).__name__} (its Linear modules are named {', '.join(linear)})")
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def is_adapter_model(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (if peft was never imported, nothing can be one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter_model(adapter_dir: str | Path, cfg: ModelSection) -> torch.nn.Module:
    """Base model + exported adapter, frozen (for eval). adapter_config.json's base_model_name_or_path is a
    directory; a relative one (as `export_model` writes for 'tiny') is relative to the adapter directory, so the
    export can be moved or downloaded from MLflow as a whole."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    base_dir = adapter_dir / base  # an absolute base path stays as it is
    if not base or not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path={base!r} is not a local model directory")
    return PeftModel.from_pretrained(_load_pretrained(base_dir, cfg), adapter_dir)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def export_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) of model and tokenizer.

    A plain model is loadable by plain AutoModelForCausalLM. A LoRA model is saved as its adapter
    (adapter_model.safetensors + adapter_config.json); when adapter_config's base_model_name_or_path is not a
    model directory on disk (the embedded 'tiny' model has none), the base weights go to out_dir/base and the
    adapter config points there by the relative path "base" (`load_adapter_model` resolves it).
    """
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if is_adapter_model(model):
        adapter_config = out_dir / ADAPTER_CONFIG
        settings = json.loads(adapter_config.read_text())
        base = settings.get("base_model_name_or_path") or ""
        if not base or not (Path(base) / "config.json").is_file():
            _plain_copy(model, merge=False).save_pretrained(out_dir / BASE_SUBDIR, safe_serialization=True)
            settings["base_model_name_or_path"] = BASE_SUBDIR
            adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True))
    tokenizer.save_pretrained(out_dir)
    return out_dir


def export_merged(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """The LoRA model with its adapters merged into the weights, as a plain model + tokenizer (safetensors)
    that AutoModelForCausalLM loads without peft. `model` itself is left as it was."""
    if not is_adapter_model(model):
        raise TypeError(f"export_merged needs a LoRA (peft) model, got {type(model).__name__}")
    out_dir = Path(out_dir)
    _plain_copy(model, merge=True).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _plain_copy(model: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """A copy of the base model without adapter layers: merged (merge_and_unload) or as it was (unload).

    peft does both in place; the copy keeps the trained model usable. It costs one model's memory briefly,
    which LoRA's small optimizer state leaves room for.
    """
    clone = copy.deepcopy(model)
    return clone.merge_and_unload() if merge else clone.unload()
