"""LoRA via peft: which parameters train, clear errors, one optimizer step, adapter export and reload.

Merged export (transformers' save_pretrained, which imports DeepSpeed through accelerate: ~2 s once) is
checked in tests/integration/test_lora.py.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from orpo_ray.config import ConfigError, load_config
from orpo_ray.train.engine import create_engine
from orpo_ray.commands.eval import resolve_checkpoint
from orpo_ray.modeling import export_model, load_model_and_tokenizer, parameter_counts

# hidden 32, MLP 64, one layer, 4 heads of 8 (k/v are 32 wide too)
TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1"]


def _model_cfg(*extra):
    return load_config(None, [*TINY, *extra]).model


def _lora(*extra):
    return load_model_and_tokenizer(_model_cfg("model.lora.enabled=true", "model.lora.r=4", *extra))


def _ids(n=2, t=12):
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(0))


def _make_adapters_nontrivial(model):
    """lora_B starts at zero (the adapted model equals the base); give it values so the adapters matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_adapter_weights_train_and_counts_match_a_hand_count():
    base, _ = load_model_and_tokenizer(_model_cfg())
    base_total = sum(p.numel() for p in base.parameters())
    model, _ = _lora()
    # r * (in + out) per adapted Linear: q, k, v, o 32->32; gate, up 32->64; down 64->32
    hand = 4 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert parameter_counts(model) == (hand, base_total + hand)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7  # A and B for each of the seven default target modules


def test_target_modules_restrict_what_is_adapted():
    model, _ = _lora("model.lora.target_modules=[q_proj, v_proj]")
    assert parameter_counts(model)[0] == 2 * 4 * (32 + 32)


def test_a_target_module_that_does_not_exist_names_it_and_the_key():
    # peft alone would adapt q_proj and silently skip the typo
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: 'qproj' matches no module.*q_proj"):
        _lora("model.lora.target_modules=[q_proj, qproj]")


def test_a_gradient_step_changes_only_adapter_weights():
    model, _ = _lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = create_engine(model, use_deepspeed=False, lr=1e-2, total_steps=2, weight_decay=0.1)
    ids = _ids()
    for _ in range(2):  # step 1 moves lora_B only (its A-side gradient is zero while B == 0); step 2 moves A
        engine.backward(model(input_ids=ids, labels=ids).loss)
        engine.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def _save_base(tmp_path):
    """A base model directory on disk (config, safetensors, tokenizer) without transformers' save_pretrained."""
    model, tok = load_model_and_tokenizer(_model_cfg())
    base = tmp_path / "base_model"
    model.config.save_pretrained(base)
    save_file(model.state_dict(), base / "model.safetensors")
    tok.save_pretrained(base)
    return base


def test_adapter_export_reloads_onto_its_base_with_the_same_logits(tmp_path):
    base = _save_base(tmp_path)
    model, tok = load_model_and_tokenizer(_model_cfg("model.lora.enabled=true", f"model.name_or_path={base}"))
    _make_adapters_nontrivial(model)
    ids = _ids()
    expected = _logits(model, ids)
    out = export_model(model, tok, tmp_path / "run" / "model")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    # the base is a directory on disk: the adapter points at it and no copy is written
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert not (out / "base").exists()

    assert resolve_checkpoint(tmp_path / "run") == out.resolve()
    reloaded, _ = load_model_and_tokenizer(_model_cfg(f"model.name_or_path={out}"))
    assert parameter_counts(reloaded)[0] == 0  # frozen: loaded for evaluation
    torch.testing.assert_close(_logits(reloaded, ids), expected)
    plain, _ = load_model_and_tokenizer(_model_cfg(f"model.name_or_path={base}"))
    assert not torch.allclose(_logits(plain, ids), expected, atol=1e-3)  # the adapters do change the model


def test_training_new_adapters_on_an_adapter_dir_is_refused(tmp_path):
    base = _save_base(tmp_path)
    model, tok = load_model_and_tokenizer(_model_cfg("model.lora.enabled=true", f"model.name_or_path={base}"))
    out = export_model(model, tok, tmp_path / "adapter")
    cfg = _model_cfg(f"model.name_or_path={out}")
    with pytest.raises(ConfigError, match="LoRA adapter directory"):
        load_model_and_tokenizer(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=True)))

