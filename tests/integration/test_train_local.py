"""The one training loop, in-process (LocalRuntime, plain torch engine): results, export, resume, NaN-proofing."""

import json
import math

import pytest
import torch

from orpo_ray.config import load_config
from orpo_ray.train.runtime import LocalRuntime
from orpo_ray.train.loop import train_loop_per_worker

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1",
        "data.synthetic.num_train=96", "data.synthetic.num_eval=16", "train.per_device_batch_size=8",
        "train.learning_rate=3e-3", "train.log_interval=1", "train.eval_interval=0", "train.precision=fp32",
        "train.progress_bar=false", "tracking.enabled=false", "train.scheduler=constant"]


def run(tmp_path, name, *overrides):
    cfg = load_config("configs/demo.yaml", [*TINY, f"output_dir={tmp_path / name}", *overrides])
    results = train_loop_per_worker(cfg.to_dict())
    history = json.loads((tmp_path / name / "history.json").read_text())
    return results, [row["loss"] for row in history if "loss" in row]


def test_run_writes_results_and_a_loadable_model(tmp_path):
    results, losses = run(tmp_path, "a", "train.max_steps=4")
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["num_steps"] == 4 and len(losses) == 4
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert math.isfinite(on_disk["train"][key])
        assert math.isfinite(on_disk["eval"]["eval_" + key])
    assert on_disk["pairs_per_second"] > 0 and on_disk["peak_rss_mb"] > 0 and on_disk["wall_seconds"] > 0
    assert on_disk["peak_gpu_mem_mb"] is None  # a CPU run: no GPU peak (gpu_check reads it on a GPU)
    assert on_disk["quarantined"] == 0 and on_disk["data"]["train_pairs"] == 96
    assert (tmp_path / "a" / "model" / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    assert model.config.vocab_size == 259


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.1"]  # dropout: RNG state must resume too


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_resume_keeps_the_loss_trajectory(tmp_path, extra):
    """Stopping after a checkpoint and re-running the same command continues exactly where it left off
    (with LoRA the checkpoint holds the adapters only; the frozen base is rebuilt from its source)."""
    _, uninterrupted = run(tmp_path, "full", "train.max_steps=6", "train.checkpoint_interval=3", *extra)
    # First attempt dies right after its step-3 checkpoint (in-process we raise instead of os._exit).
    cfg = load_config("configs/demo.yaml", [*TINY, f"output_dir={tmp_path / 'resumed'}", "train.max_steps=6",
                                            "train.checkpoint_interval=3", *extra])
    class Stop(Exception):
        pass

    class StopAfterCheckpoint(LocalRuntime):
        def report(self, metrics, checkpoint_dir=None):
            super().report(metrics, checkpoint_dir)
            if checkpoint_dir:
                raise Stop()

    with pytest.raises(Stop):
        train_loop_per_worker(cfg.to_dict(), runtime=StopAfterCheckpoint(cfg))
    results, resumed = run(tmp_path, "resumed", "train.max_steps=6", "train.checkpoint_interval=3", *extra)
    assert results["resumed_from_step"] == 3
    if extra:
        saved = torch.load(tmp_path / "resumed" / "checkpoints" / "step_3" / "engine_state.pt", weights_only=True)
        assert saved["model"] and all("lora_" in k for k in saved["model"])
    # history.json of the resumed attempt holds steps 1..3 (carried by the checkpoint) and 4..6; all equal the
    # uninterrupted run's.
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=1e-6, atol=1e-7)


def test_prompt_filling_max_length_never_gives_nan(tmp_path):
    """TRL's failure mode: prompts as long as max_length. Ours keeps the prompt's end and >= 1 response token."""
    long_prompts = tmp_path / "long.jsonl"
    rows = [{"prompt": "word " * 200 + f"question {i}?", "chosen": " yes indeed", "rejected": " no"} for i in range(32)]
    long_prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, losses = run(tmp_path, "long", f"data.train_path={long_prompts}", f"data.eval_path={long_prompts}",
                          "data.max_length=64", "data.max_prompt_length=60", "train.max_steps=3")
    assert all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(v) for v in results["eval"].values())
    assert results["data"]["truncated_pairs"] == 64  # every train and eval pair was cut


def test_bad_rows_are_quarantined_not_fatal(tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = [json.dumps({"prompt": f"Sort: cba{i}\nAnswer:", "chosen": " abc", "rejected": " acb"}) for i in range(24)]
    data.write_text("\n".join(good[:12] + ["{not json", json.dumps({"prompt": "x", "chosen": 3, "rejected": "y"})]
                              + good[12:]) + "\n")
    results, _ = run(tmp_path, "bad", f"data.train_path={data}", f"data.eval_path={data}", "train.max_steps=2")
    assert results["quarantined"] == 4  # two bad rows, counted once for train and once for eval
    lines = [json.loads(line) for line in (tmp_path / "bad" / "quarantine.jsonl").read_text().splitlines()]
    assert {(q["row"], q["reason"].split(":")[0]) for q in lines} == {(13, "invalid JSON"), (14, "field 'chosen' is int, expected str")}


def test_gradient_accumulation_trains_like_the_whole_batch(tmp_path):
    """4 pairs x 2 accumulation steps = 8 pairs at once: same losses (the NLL is pooled over the step's tokens,
    not averaged per micro-batch) and the same eval figures (pooled over the eval set, whatever its batching)."""
    steps = ["train.max_steps=4", "train.eval_interval=4"]
    whole, whole_losses = run(tmp_path, "whole", *steps)
    accum, accum_losses = run(tmp_path, "accum", *steps, "train.per_device_batch_size=4",
                              "train.gradient_accumulation_steps=2")
    assert accum["global_batch_pairs"] == whole["global_batch_pairs"] == 8
    assert len(set(whole_losses)) == 4  # it trains
    torch.testing.assert_close(torch.tensor(accum_losses), torch.tensor(whole_losses), rtol=1e-5, atol=1e-7)
    for key in ("eval_loss", "eval_nll_loss", "eval_logps/chosen", "eval_rewards/accuracies"):
        assert accum["eval"][key] == pytest.approx(whole["eval"][key], rel=1e-5), key


def test_final_step_is_checkpointed_and_a_failed_final_evaluation_resumes_there(tmp_path, monkeypatch):
    """The last step is checkpointed before the final evaluation and export; when those fail, re-running evaluates
    and exports from that checkpoint without training again. A step dir left half-written (no COMPLETE marker)
    with a higher step is never resumed from."""
    import orpo_ray.train.loop as loop

    overrides = ["train.max_steps=4", "train.checkpoint_interval=3"]
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("eval died")))
    with pytest.raises(RuntimeError, match="eval died"):
        run(tmp_path, "final", *overrides)
    checkpoints = tmp_path / "final" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_3", "step_4"]
    assert (checkpoints / "step_4" / "COMPLETE").exists() and not (tmp_path / "final" / "results.json").exists()
    partial = checkpoints / "step_9"  # a save that died half-way, at a later step
    partial.mkdir()
    (partial / "engine_state.pt").write_text("not a checkpoint")
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    results, losses = run(tmp_path, "final", *overrides)
    assert results["resumed_from_step"] == 4 and results["num_steps"] == 4
    assert len(losses) == 4 and math.isfinite(results["eval"]["eval_loss"])  # history came back with the checkpoint
    assert (tmp_path / "final" / "model" / "model.safetensors").exists()
