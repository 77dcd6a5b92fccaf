"""`orpo-ray plan CONFIG`: the resolved run without starting it (orpo_ray/plan.py), from a model built on the meta
device (no weights loaded, nothing allocated), so a 7B config can be planned on a laptop that has its config.json."""

from __future__ import annotations

import json
import os

import torch

from orpo_ray.config import Config
from orpo_ray.launch.session import run_allocator
from orpo_ray.modeling import apply_lora, build_tiny_model, parameter_counts
from orpo_ray.omp_wait import describe as describe_spin_count
from orpo_ray.plan import format_plan, model_shape, resolve_plan
from orpo_ray.tokenizer import load_tokenizer


def meta_model(cfg: Config) -> torch.nn.Module:
    with torch.device("meta"):
        if cfg.model.name_or_path == "tiny":
            model = build_tiny_model(cfg.model, load_tokenizer(cfg.model))
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(cfg.model.name_or_path, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(config)
        return apply_lora(model, cfg.model.lora) if cfg.model.lora.enabled else model


def run_plan(cfg: Config, *, local: bool = False) -> dict:
    """`local`: the plan of `train --local` (one process, plain torch engine) instead of the Ray run."""
    model = meta_model(cfg)
    trainable, total = parameter_counts(model)
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    # train --local restarts itself on the malloc a local instance's workers get (cli.py).
    a = run_allocator(cfg, local_instance=local or not cfg.scaling.cluster_address())
    plan = resolve_plan(cfg, shape=model_shape(model, cfg.model.attn_implementation, device), trainable=trainable,
                        total=total, use_deepspeed=cfg.deepspeed.resolved(cfg.scaling.num_workers) and not local,
                        device=device, allocator=f"{a.name} ({a.reason})",
                        omp_spin_count=describe_spin_count(cfg.scaling.omp_spin_count, os.environ))
    print(format_plan(plan))
    print(json.dumps(plan, indent=1))
    return plan
