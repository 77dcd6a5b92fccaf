"""The resolved run, before it starts: workers, precision, fast-path switches, data, and a memory estimate.

`resolve_plan` is the one function behind `orpo-ray plan CONFIG` (commands/plan.py, which builds the model on the
meta device to count parameters without loading weights) and the header of every run's log, results.json
("plan") and MLflow params ("plan.*"), which the training loop fills in from the model it loaded.

Memory per worker = model states (DeepSpeed's own estimators for the ZeRO stage, in train/engine.py) +
activations at the configured batch and length (the formula below; an upper bound: every row at max_length).
"""

from __future__ import annotations

import os

import torch

from orpo_ray.allocator import active_allocator
from orpo_ray.config import Config
from orpo_ray.forward.fast_path import SWITCHES, segment_attention_on
from orpo_ray.omp_wait import active as active_spin_count
from orpo_ray.precision import select_precision
from orpo_ray.train.engine import estimate_model_states_bytes

GB = 1024**3


def activation_bytes(cfg: Config, shape: dict, precision: str) -> dict:
    """Activations kept for backward in one micro-batch (2 x per_device_batch_size rows at data.max_length).

    Per token and layer a Llama-style decoder keeps about 10 hidden-sized tensors (norm inputs/outputs, q, o,
    residuals), 4 KV-sized ones (k, v before/after rotary) and 4 MLP-sized ones (gate, up, act, product), at 2 bytes
    under bf16 autocast, 4 in fp32. Attention that materialises scores (eager, or SDPA's math kernel on CPU) adds
    heads x T per token and layer. The lm-head adds fp32 logits [rows, T, V] unless chunked (chunk x V).
    """
    rows, length = 2 * cfg.train.per_device_batch_size, cfg.data.max_length
    tokens = rows * length
    b = 2 if precision == "bf16" else 4
    h, kv, inter, layers, heads = (shape[k] for k in ("hidden", "kv_hidden", "intermediate", "layers", "heads"))
    per_token_layer = b * (10 * h + 4 * kv + 4 * inter)
    scores = b * heads * length if shape.get("dense_scores") else 0
    layers_total = tokens * layers * (per_token_layer + scores)
    e = cfg.efficiency
    lm_rows = e.lm_head_chunk_size if e.chunked_lm_head else tokens
    logits = 4 * lm_rows * shape["vocab"] * (1 if e.chunked_lm_head else 2)  # full: logits + fp32 log-softmax copy
    return {"layers": layers_total, "lm_head": logits, "tokens": tokens}


def worker_memory_bytes(cfg: Config, workers: int) -> tuple[int | None, str]:
    s = cfg.scaling
    if s.memory_per_worker_gb:
        return int(s.memory_per_worker_gb * GB), "scaling.memory_per_worker_gb"
    if s.use_gpu:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, f"GPU 0 here ({torch.cuda.get_device_name(0)})"
        return None, "unknown: no GPU visible here (set scaling.memory_per_worker_gb)"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // workers, f"this machine's RAM / {workers} worker(s)"


def _torch_engine_line(cfg: Config, workers: int) -> str:
    why = ("deepspeed.enabled: false" if cfg.deepspeed.enabled is False
           else "one worker: nothing for ZeRO to shard (deepspeed.enabled: auto)")
    return f"torch AdamW ({why}" + (", gradients averaged across workers)" if workers > 1 else ")")


def resolve_plan(cfg: Config, *, shape: dict, trainable: int, total: int, use_deepspeed: bool,
                 device: torch.device | str, world_size: int | None = None, allocator: str | None = None,
                 omp_spin_count: str | None = None) -> dict:
    """The run as it will execute. `shape`: see `model_shape`. `world_size`: the workers that actually run (1 for
    an in-process run), else scaling.num_workers. `allocator`: the workers' malloc as planned; None: this
    process's own (a worker reports what it runs on); `omp_spin_count` likewise (omp_wait.py)."""
    s, d, e, t = cfg.scaling, cfg.deepspeed, cfg.efficiency, cfg.train
    workers = world_size or s.num_workers
    precision, reason = select_precision(t.precision, device)
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    states = estimate_model_states_bytes(
        trainable, total - trainable, zero_stage=d.zero_stage, world_size=workers, use_deepspeed=use_deepspeed,
        offload_optimizer=d.offload_optimizer, offload_param=d.offload_param,
        largest_layer_params=shape["largest_layer_params"], weight_bytes=weight_bytes)
    acts = activation_bytes(cfg, shape, precision)
    estimate = states["device"] + acts["layers"] + acts["lm_head"]
    limit, limit_source = worker_memory_bytes(cfg, workers)
    plan = {
        "workers": workers,
        "resources_per_worker": {"CPU": planned_cpus_per_worker(cfg), **({"GPU": 1} if s.use_gpu else {})},
        "device": str(torch.device(device).type),
        "backend": "nccl" if s.use_gpu else "gloo",
        "engine": f"DeepSpeed ZeRO-{d.zero_stage}" + (" + optimizer offload" if d.offload_optimizer else "")
                  if use_deepspeed else _torch_engine_line(cfg, workers),
        "precision": f"{precision} ({reason})",
        "attention": cfg.model.attn_implementation,
        "allocator": allocator or active_allocator(),
        "omp_spin_count": omp_spin_count or active_spin_count(os.environ),
        "fast_path": {**{k: getattr(e, k) for k in SWITCHES}, "lm_head": e.lm_head,
                      # 'auto' decided for the workers' device, as the run will decide it
                      "segment_attention": segment_attention_on(e.segment_attention, torch.device(device))},
        "data": {"train": d_source(cfg, "train"), "eval": d_source(cfg, "eval"),
                 "max_length": cfg.data.max_length},
        "parameters": {"trainable": trainable, "total": total},
        "global_batch_pairs": t.per_device_batch_size * t.gradient_accumulation_steps * workers,
        "memory_gb": {
            "model_states": round(states["device"] / GB, 3), "model_states_how": states["how"],
            "host_model_states": round(states["host"] / GB, 3),
            "activations": round(acts["layers"] / GB, 3), "lm_head": round(acts["lm_head"] / GB, 3),
            "estimate": round(estimate / GB, 3),
            "worker_limit": None if limit is None else round(limit / GB, 3), "worker_limit_source": limit_source,
        },
        "warnings": [],
    }
    if limit is not None and estimate > limit:
        plan["warnings"].append(
            f"estimated {estimate / GB:.1f} GB per worker exceeds the worker's {limit / GB:.1f} GB ({limit_source}): "
            "lower per_device_batch_size / max_length, switch on efficiency.chunked_lm_head, raise the ZeRO stage "
            "or offload the optimizer")
    return plan


def d_source(cfg: Config, split: str) -> str:
    d = cfg.data
    if d.train_path is None:
        n = d.synthetic.num_train if split == "train" else d.synthetic.num_eval
        return f"synthetic '{d.synthetic.task}' task, {n} pairs"
    if split == "train":
        return d.train_path + (f" (first {d.max_train_pairs} pairs)" if d.max_train_pairs else "")
    return d.eval_path or f"{d.eval_split} split of train_path, else {d.eval_fraction:.0%} of it"


def format_plan(plan: dict) -> str:
    """The plan as the lines that head a run's log."""
    m = plan["memory_gb"]
    lines = [
        f"[orpo-ray] plan: {plan['workers']} worker(s) x {plan['resources_per_worker']} on {plan['device']} "
        f"({plan['backend']}) | {plan['engine']} | precision {plan['precision']} | attention {plan['attention']} "
        f"| malloc {plan['allocator']} | OpenMP spin {plan['omp_spin_count']}",
        f"[orpo-ray] plan: fast path {plan['fast_path']} | global batch {plan['global_batch_pairs']} pairs | "
        f"parameters {plan['parameters']['trainable']:,} trainable / {plan['parameters']['total']:,}",
        f"[orpo-ray] plan: data train={plan['data']['train']} | eval={plan['data']['eval']} | "
        f"max_length {plan['data']['max_length']}",
        f"[orpo-ray] plan: memory per worker ~{m['estimate']} GB = model states {m['model_states']} "
        f"({m['model_states_how']}) + activations {m['activations']} + lm-head {m['lm_head']}; "
        f"worker has {m['worker_limit']} GB ({m['worker_limit_source']})",
    ]
    lines += [f"[orpo-ray] plan WARNING: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def model_shape(model: torch.nn.Module, attn_implementation: str, device: torch.device | str) -> dict:
    """What `activation_bytes` and the ZeRO-3 estimator need, read from a (possibly meta-device) HF model."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    # The MLP width has a name per family: intermediate_size (Llama-like, GPT-NeoX), ffn_dim (OPT), n_inner
    # (GPT-2, where None means 4 x hidden).
    intermediate = _first_config_value(c, ("intermediate_size", "ffn_dim", "n_inner")) or 4 * c.hidden_size
    return {"hidden": c.hidden_size, "kv_hidden": kv_heads * head_dim, "intermediate": intermediate,
            "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "vocab": c.vocab_size,
            "largest_layer_params": largest,
            # SDPA on CUDA runs flash / memory-efficient kernels; on CPU (and eager anywhere) it holds T x T scores.
            "dense_scores": attn_implementation == "eager" or torch.device(device).type != "cuda"}


def _first_config_value(config, names: tuple[str, ...]):
    """The first of `names` the config has a value for (transformers raises AttributeError for absent ones)."""
    for name in names:
        try:
            value = getattr(config, name)
        except AttributeError:
            continue
        if value is not None:
            return value
    return None


def planned_cpus_per_worker(cfg: Config) -> int | str:
    """CPUs per worker as the run will ask Ray for them. `auto` is resolved where it can be without Ray: a run
    that starts its own local instance splits this machine's cores across the workers (launch.session does the
    same with the started instance's CPUs); on a cluster it depends on the node count, said in words."""
    s = cfg.scaling
    if s.cpus_per_worker == "auto" and s.cluster_address():
        return "auto (a one-node cluster's CPUs split across the workers; 1 on a multi-node cluster)"
    return s.resolved_cpus(os.cpu_count() or 1)

