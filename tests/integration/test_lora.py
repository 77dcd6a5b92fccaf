"""LoRA end to end: merged export, an in-process run (export, eval of the adapter), and 2 Ray Train workers
under DeepSpeed ZeRO-2 with frozen base weights, including a restart from an adapter-only checkpoint.

Resume of an in-process LoRA run: tests/integration/test_train_local.py::test_resume_keeps_the_loss_trajectory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orpo_ray.config import load_config
from orpo_ray.commands.eval import run_eval
from orpo_ray.launch.trainer import run_training
from orpo_ray.modeling import export_merged, export_model, load_model_and_tokenizer, parameter_counts
from tests.integration.ray_train_helpers import DEMO, TINY, ReportRecorder, losses, read_reports
from tests.integration.test_train_local import LORA, run
from tests.integration.test_train_local import TINY as LOCAL_TINY

pytestmark = pytest.mark.integration


def _ids():
    return torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _fresh_base_state(cfg_path: str, overrides: list[str]) -> dict:
    """The untrained 'tiny' weights of a config: what the base must still be after LoRA training."""
    model, _ = load_model_and_tokenizer(load_config(cfg_path, [*overrides, "model.lora.enabled=false"]).model)
    return model.state_dict()


def _assert_only_adapters_trained(run_dir: Path, base_state: dict) -> None:
    """The exported base equals the untrained model; the exported adapters moved away from lora_B = 0."""
    exported_base = load_file(run_dir / "model" / "base" / "model.safetensors")
    assert exported_base.keys() == base_state.keys()
    for name, tensor in exported_base.items():
        assert torch.equal(tensor, base_state[name]), name
    adapters = load_file(run_dir / "model" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapters) and all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)


def test_merged_export_is_a_plain_model_with_the_adapter_logits(tmp_path):
    cfg = load_config(None, [*TINY, *LORA]).model
    model, tok = load_model_and_tokenizer(cfg)
    with torch.no_grad():  # lora_B starts at zero; make the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    expected = _logits(model)
    base_only = _logits(load_model_and_tokenizer(load_config(None, TINY).model)[0])
    assert not torch.allclose(expected, base_only, atol=1e-3)

    export_model(model, tok, tmp_path / "model")
    export_merged(model, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-5)
    # the trained model is left as it was (merge_and_unload ran on a copy)
    assert any("lora_B" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    # the adapter export of 'tiny' carries its base: it reloads from the directory alone
    assert json.loads((tmp_path / "model" / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    reloaded, _ = load_model_and_tokenizer(load_config(None, [*TINY, f"model.name_or_path={tmp_path / 'model'}"]).model)
    torch.testing.assert_close(_logits(reloaded), expected)


def test_local_lora_run_exports_adapter_and_merged_model_and_evaluates(tmp_path):
    results, run_losses = run(tmp_path, "lora", *LORA, "train.max_steps=4", "export.merge_lora=true")
    out = tmp_path / "lora"
    model, _ = load_model_and_tokenizer(load_config(DEMO, [*TINY, *LORA]).model)
    trainable, total = parameter_counts(model)
    assert results["parameters"] == {"trainable": trainable, "total": total} and trainable < total / 10
    assert len(run_losses) == 4 and run_losses[-1] < run_losses[0]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["model_dir"] == str((out / "model").resolve())
    assert on_disk["merged_dir"] == str((out / "merged").resolve())
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    _assert_only_adapters_trained(out, _fresh_base_state(DEMO, TINY))

    # `orpo-ray eval` on the run's output_dir loads the adapter onto the exported base: same held-out metrics
    cfg = load_config(DEMO, [*LOCAL_TINY, *LORA, "export.merge_lora=true", f"output_dir={tmp_path / 'eval'}",
                             f"eval.checkpoint={out}", "eval.num_generations=1", "eval.max_new_tokens=4"])
    evaluated = run_eval(cfg)
    assert evaluated["checkpoint"] == str((out / "model").resolve())
    assert evaluated["eval"]["eval_loss"] == pytest.approx(results["eval"]["eval_loss"], rel=1e-5)


def _train_ray(out: Path, cache: Path, *overrides: str, record: Path) -> dict:
    cfg = load_config(DEMO, [*TINY, *LORA, f"output_dir={out}", f"data.cache_dir={cache}", "scaling.num_workers=2",
                             "train.per_device_batch_size=4", "train.checkpoint_interval=2", *overrides])
    return run_training(cfg, callbacks=[ReportRecorder(str(record))])


def test_two_ray_workers_train_lora_under_zero2_and_resume_from_adapter_checkpoints(ray_local, tmp_path):
    """DeepSpeed ZeRO-2 gets only the adapter weights; the run exports, and a worker killed after step 3
    restarts from the step-2 checkpoint (adapters + optimizer shards only) onto the same trajectory."""
    cache = tmp_path / "cache"
    clean = _train_ray(tmp_path / "clean", cache, record=tmp_path / "clean.jsonl")
    assert clean["world_size"] == 2 and clean["parameters"]["trainable"] < clean["parameters"]["total"] / 10
    _assert_only_adapters_trained(tmp_path / "clean", _fresh_base_state(DEMO, TINY))
    checkpoint = Path([r["checkpoint"] for r in read_reports(tmp_path / "clean.jsonl") if r["checkpoint"]][-1])
    module = torch.load(next(checkpoint.rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert module and all("lora_" in k for k in module)  # frozen base weights are left out of checkpoints

    fault = _train_ray(tmp_path / "fault", cache, "train.fail_at_step=3", "scaling.max_failures=1",
                       record=tmp_path / "fault.jsonl")
    assert (tmp_path / "fault" / ".fault_injected_step_3").exists() and fault["resumed_from_step"] == 2
    resumed, uninterrupted = losses(tmp_path / "fault"), losses(tmp_path / "clean")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-2 come back from the checkpoint
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(1, 7)]),
                               torch.tensor([uninterrupted[s] for s in range(1, 7)]), rtol=1e-6, atol=1e-7)
