"""`orpo-ray plan`: the resolved run and its per-worker memory estimate (DeepSpeed's estimators + activations)."""

import dataclasses
import os

import pytest

from orpo_ray.commands.plan import meta_model, run_plan
from orpo_ray.config import load_config
from orpo_ray.plan import activation_bytes, resolve_plan

SHAPE = {"hidden": 8, "kv_hidden": 4, "intermediate": 16, "layers": 2, "heads": 2, "vocab": 10,
         "largest_layer_params": 80, "dense_scores": False}


def test_activation_bytes_by_hand():
    cfg = load_config(None, ["train.per_device_batch_size=3", "data.max_length=5", "data.max_prompt_length=2",
                             "efficiency.chunked_lm_head=false"])
    # 2 x 3 rows x 5 tokens = 30 tokens; per token and layer 4 B x (10*8 + 4*4 + 4*16) = 640 B; 2 layers.
    # Full lm-head: fp32 logits + log-softmax copy = 2 x 4 B x 30 x 10.
    assert activation_bytes(cfg, SHAPE, "fp32") == {"layers": 30 * 2 * 640, "lm_head": 2 * 4 * 30 * 10, "tokens": 30}
    bf16 = activation_bytes(cfg, {**SHAPE, "dense_scores": True}, "bf16")
    assert bf16["layers"] == 30 * 2 * (320 + 2 * 2 * 5)  # + heads x T scores at 2 B
    chunked = load_config(None, ["train.per_device_batch_size=3", "data.max_length=5", "data.max_prompt_length=2",
                                 "efficiency.chunked_lm_head=true", "efficiency.lm_head_chunk_size=4"])
    assert activation_bytes(chunked, SHAPE, "fp32")["lm_head"] == 4 * 4 * 10


def test_plan_warns_when_the_estimate_exceeds_the_workers_memory():
    cfg = load_config(None, ["scaling.memory_per_worker_gb=0.001"])
    plan = resolve_plan(cfg, shape=SHAPE, trainable=10**6, total=10**6, use_deepspeed=False, device="cpu")
    assert plan["memory_gb"]["estimate"] > 0.001 and "exceeds the worker's" in plan["warnings"][0]
    roomy = resolve_plan(load_config(None, ["scaling.memory_per_worker_gb=100"]), shape=SHAPE, trainable=10**6,
                         total=10**6, use_deepspeed=False, device="cpu")
    assert roomy["warnings"] == []


def test_plan_of_a_model_directory_counts_parameters_without_loading_weights(tmp_path, capsys):
    from transformers import MistralConfig

    MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)  # config.json only, no weights
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tmp_path}", "scaling.use_gpu=true",
                             "scaling.memory_per_worker_gb=80"])
    model = meta_model(cfg)
    assert next(model.parameters()).is_meta
    plan = run_plan(cfg)
    # embed 100x64 + lm_head 64x100 + norm 64 + 2 layers x (q 64x64, k,v 64x32, o 64x64, mlp 3x64x128, 2 norms x 64)
    assert plan["parameters"]["total"] == 2 * 6400 + 64 + 2 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 128)
    # cpus_per_worker: auto, no cluster address -> a local instance: this machine's cores for the one worker
    assert plan["backend"] == "nccl" and plan["resources_per_worker"] == {"CPU": os.cpu_count(), "GPU": 1}
    assert "[orpo-ray] plan: memory per worker" in capsys.readouterr().out
    # ... whose workers run on Ray's bundled jemalloc (scaling.allocator: auto); on a cluster, its own malloc
    assert plan["allocator"].startswith("jemalloc (Ray's bundled libjemalloc.so")
    assert run_plan(dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, address="10.0.0.1:6379"))
                    )["allocator"].startswith("system (a cluster")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox", "qwen3_moe"])
def test_model_shape_reads_every_familys_mlp_width(family):
    """Each family names its MLP width differently (intermediate_size, OPT's ffn_dim, GPT-2's n_inner = None ->
    4 x hidden); the plan every run prints must read all of them (OPT and GPT-2 runs crashed on it)."""
    from orpo_ray.commands.families import FAMILIES, build_model
    from orpo_ray.plan import model_shape

    shape = model_shape(build_model(family), "sdpa", "cpu")
    c = FAMILIES[family]()
    expected = {"opt": getattr(c, "ffn_dim", None), "gpt2": 4 * c.hidden_size}.get(family) or c.intermediate_size
    assert shape["intermediate"] == expected and shape["layers"] == 2


@pytest.mark.parametrize("overrides, workers, expected", [
    ([], 1, False),                                        # auto, one worker: nothing to shard
    ([], 2, True),                                         # auto, data-parallel: ZeRO-2
    (["deepspeed.offload_optimizer=true"], 1, True),       # auto, offload needs DeepSpeed even on one worker
    (["deepspeed.enabled=true"], 1, True),
    (["deepspeed.enabled=false"], 4, False),
])
def test_deepspeed_auto_means_something_to_shard_or_offload(overrides, workers, expected):
    cfg = load_config(None, [f"scaling.num_workers={workers}", *overrides])
    assert cfg.deepspeed.resolved(workers) is expected
    if not expected:  # (the DeepSpeed plans import deepspeed's estimator: tests/integration/test_plan_deepspeed.py)
        plan = run_plan(cfg)
        assert plan["engine"].startswith("torch AdamW (") and (("gradients averaged" in plan["engine"]) == (workers > 1))
