"""HF save_pretrained outputs (safetensors) load back through the real from_pretrained path.

Integration rather than unit: the first save_pretrained pays transformers' lazy imports (~1-3 s).
"""

import torch

from orpo_ray.config import load_config
from orpo_ray.modeling import export_model, load_model_and_tokenizer


def _tiny_cfg(*extra):
    return load_config(None, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
                              "model.tiny.num_hidden_layers=1", *extra]).model


def test_local_directory_round_trip(tmp_path):
    model, tok = load_model_and_tokenizer(_tiny_cfg())
    export_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded, tok2 = load_model_and_tokenizer(_tiny_cfg(f"model.name_or_path={tmp_path / 'm'}"))
    x = torch.tensor([tok.encode("Sort: cab", add_special_tokens=False)])
    torch.testing.assert_close(model(x).logits, loaded(x).logits)
    assert tok2.encode("héllo", add_special_tokens=False) == tok.encode("héllo", add_special_tokens=False)
    assert tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id


