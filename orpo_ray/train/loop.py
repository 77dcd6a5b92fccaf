"""The training loop: one function, read top to bottom; the loss comes from the configured objective.

`train_loop_per_worker(config)` is what Ray Train runs on every worker (and what a 1-worker in-process
run calls directly). Everything environment-specific - rank, data shard, averaging across ranks,
checkpoint storage - comes from a `WorkerRuntime`; everything DeepSpeed-specific comes from `engine`.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from orpo_ray.config import Config, split_loop_config
from orpo_ray.console import progress_interval
from orpo_ray.cpu_wait import ThreadWaitMeter
from orpo_ray.data.tokenize import use_chat_template
from orpo_ray.forward.chunked_lm_head import release_chunk_buffers
from orpo_ray.forward.fast_path import resolve_fast_path
from orpo_ray.forward.layouts import make_collate, make_policy_loss, matmul_rows
from orpo_ray.forward.logprobs import nll_target_mask
from orpo_ray.modeling import (
    export_merged,
    export_model,
    load_model_and_tokenizer,
    parameter_counts,
)
from orpo_ray.objectives import build_objective, step_nll_weights
from orpo_ray.output_staging import upload_from_other_host
from orpo_ray.plan import format_plan, model_shape, resolve_plan
from orpo_ray.precision import autocast_context, hardware_summary, select_precision
from orpo_ray.results import no_eval_reason, write_results
from orpo_ray.train.engine import create_engine, deepspeed_section
from orpo_ray.train.evaluation import evaluate, reduce_metrics, to_device
from orpo_ray.train.metrics import MetricAverager
from orpo_ray.train.runtime import COMPLETE_MARKER, LocalRuntime, WorkerRuntime


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mem_mb(device: torch.device) -> float | None:
    """Peak memory torch's allocator handed out on the worker's GPU (None on CPU): what a GPU run's size is."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def train_loop_per_worker(config: dict, runtime: WorkerRuntime | None = None) -> dict:
    cfg, extras = split_loop_config(config)
    objective = build_objective(cfg)
    runtime = runtime or LocalRuntime(cfg)
    is_main = runtime.rank == 0
    t = cfg.train
    torch.manual_seed(t.seed)

    # ---- model, tokenizer, precision ------------------------------------------------------------
    precision, precision_reason = select_precision(t.precision, runtime.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    # The template the data is rendered with (data.chat_template) travels with the exported tokenizer, on every
    # runtime: through Ray the driver rendered the data with its own tokenizer, and this one never saw it.
    use_chat_template(tokenizer, cfg.data.chat_template)
    model.to(runtime.device)
    trainable, total = parameter_counts(model)
    # Switches this model cannot take are turned off here, for training and evaluation alike (never silently).
    fast_path = resolve_fast_path(model, cfg)
    cfg = fast_path.apply(cfg)
    fast_path.fuse(model)

    # ---- data: every rank gets the same number of micro-batches per epoch ------------------------
    data_stats = runtime.setup_data(cfg, tokenizer)
    per_epoch = runtime.micro_batches_per_epoch() // t.gradient_accumulation_steps
    if per_epoch < 1:
        raise ValueError(
            f"{data_stats['train_pairs']} training pairs give no full optimizer step per epoch at "
            f"per_device_batch_size={t.per_device_batch_size} x gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps} x {runtime.world_size} workers"
        )
    total_steps = t.total_steps(per_epoch)
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * runtime.world_size

    use_deepspeed = cfg.deepspeed.resolved(runtime.world_size) and runtime.supports_deepspeed
    engine = create_engine(
        model,
        use_deepspeed=use_deepspeed,
        lr=t.learning_rate,
        total_steps=total_steps,
        # A short run (e.g. `train.max_steps=4` on the demo) keeps its warm-up within the run.
        warmup_steps=min(total_steps, t.warmup_steps or int(t.warmup_ratio * total_steps)),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        grad_accum=t.gradient_accumulation_steps,
        micro_batch_size=t.per_device_batch_size,
        bf16=precision == "bf16",
        schedule=t.scheduler,
        betas=tuple(t.adam_betas),
        ds_section=deepspeed_section(cfg.deepspeed),
    )
    # The resolved run, as `orpo-ray plan` shows it: heads the log, goes to results.json and MLflow params
    # (after the engine: DeepSpeed's estimators import deepspeed, whose accelerator the engine sets first).
    plan = resolve_plan(cfg, shape=model_shape(model, cfg.model.attn_implementation, runtime.device),
                        trainable=trainable, total=total, use_deepspeed=use_deepspeed, device=runtime.device,
                        world_size=runtime.world_size)
    with runtime.latest_checkpoint() as ckpt_dir:
        start_step = engine.global_step if engine.load(ckpt_dir) else 0
    # What the checkpoint carries besides the engine: the metrics so far (results.json and plots stay whole).
    train_metrics: dict = dict(engine.client_state.get("train_metrics", {}))
    history: list[dict] = list(engine.client_state.get("history", []))  # one row per log/eval

    # An empty eval set (eval_fraction=0, max_eval_pairs=0, an eval file all quarantined, a small split) means no
    # evaluation, said once - never a crash at the first evaluation, which would lose the trained model.
    eval_skipped = None if data_stats["eval_pairs"] else no_eval_reason(cfg)
    tracker = _start_tracker(cfg, extras, is_main)
    if is_main and eval_skipped:
        print(f"[orpo-ray] warning: {eval_skipped}", flush=True)
    if is_main:
        print(format_plan(plan), flush=True)
        print(f"[orpo-ray] {trainable:,}/{total:,} trainable parameters{' (LoRA adapters)' if cfg.model.lora.enabled else ''}"
              f" | precision {precision} ({precision_reason}) "
              f"| {objective} | {data_stats} | {total_steps} steps of {global_batch} pairs"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)
        for line in fast_path.lines():
            print(line, flush=True)
        tracker.log_start(cfg, data_stats, precision, plan, fast_path.record())

    # ---- the loop ------------------------------------------------------------------------------
    micro_iter = _micro_batches(runtime, start_micro=start_step * t.gradient_accumulation_steps)
    pad_id = tokenizer.pad_token_id
    window = MetricAverager()          # train metrics since the last log
    eval_metrics: dict = {}
    timed_steps, timed_seconds = 0, 0.0  # optimisation loop only: first step (warm-up) and eval excluded
    timed_tokens = step_tokens = 0      # non-pad tokens (prompt counted in both sequences of a pair, as TRL feeds them)
    nll_on_prompt = objective.nll_on_prompt
    collate = make_collate(cfg, pad_id, matmul_rows(engine.model, precision, runtime.device))
    policy_loss = make_policy_loss(cfg, objective)
    cpu_wait = ThreadWaitMeter()  # the timed steps' wait for a CPU (the Ray tax, cpu_wait.py); outside the timing
    wall_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc=objective.name, disable=not (is_main and t.progress_bar),
               file=sys.stdout, dynamic_ncols=True, mininterval=progress_interval(sys.stdout))
    for step in range(start_step, total_steps):
        if step > start_step:
            cpu_wait.begin()
        step_start = time.perf_counter()
        engine.model.train()
        micro_batches = [to_device(collate(next(micro_iter)), runtime.device)
                         for _ in range(t.gradient_accumulation_steps)]
        step_tokens = sum(int(batch["attention_mask"].sum()) for batch in micro_batches)
        # The NLL is a token mean over the whole step (all micro-batches, all ranks), so the trajectory does not
        # depend on how the global batch is split; the masks give the token counts before any forward pass.
        nll_tokens = [float(nll_target_mask(batch, nll_on_prompt).sum()) for batch in micro_batches]
        step_nll_tokens = float(runtime.all_reduce_sum(torch.tensor([sum(nll_tokens)], dtype=torch.float64))[0])
        nll_weights = step_nll_weights(nll_tokens, step_nll_tokens, len(micro_batches) * runtime.world_size)
        for batch, nll_weight in zip(micro_batches, nll_weights):
            with autocast_context(precision, runtime.device):
                loss, metrics = policy_loss(engine.model, batch, nll_weight)
            engine.backward(loss)
            engine.step()  # DeepSpeed semantics: only updates at the accumulation boundary
            window.add(metrics)
        done = step + 1
        if step > start_step:  # the first step of a (re)start pays one-off allocation costs
            timed_steps += 1
            timed_tokens += step_tokens
            timed_seconds += time.perf_counter() - step_start
            cpu_wait.end()

        if t.fail_at_step is not None and done == t.fail_at_step and is_main and not extras.get("no_fault"):
            _inject_fault(cfg, done)

        if done % t.log_interval == 0 or done == total_steps:
            train_metrics = reduce_metrics(window, runtime, objective)
            window = MetricAverager()
            train_metrics.update(learning_rate=engine.lr(), epoch=done / per_epoch)
            history.append({"step": done, **train_metrics})
            tracker.log_metrics(train_metrics, step=done)
            if timed_seconds:
                bar.set_postfix(loss=f"{train_metrics['loss']:.4f}",  # refresh=False: mininterval decides
                                pairs_s=f"{timed_steps * global_batch / timed_seconds:.1f}", refresh=False)

        if t.checkpoint_interval and (done % t.checkpoint_interval == 0 or done == total_steps):
            # The final step too, before the final evaluation and export: a failure there resumes from here
            # instead of losing everything since the last interval. Reported at once (a report is a barrier and
            # registers the checkpoint), apart from the evaluation's report below. Only checkpoints and
            # evaluations go to Ray: a report blocks until Ray Train's controller has taken the previous one,
            # and it polls workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reporting every log step
            # capped training at one step per ~1.5 s here. Per-step metrics reach MLflow, history.json and the
            # progress bar directly.
            checkpoint_dir = runtime.checkpoint_staging_dir(done)
            engine.save(checkpoint_dir, client_state={"train_metrics": train_metrics, "history": history})
            (Path(checkpoint_dir) / COMPLETE_MARKER).touch()
            runtime.report({"step": done, **train_metrics}, checkpoint_dir)

        if not eval_skipped and ((t.eval_interval and done % t.eval_interval == 0) or done == total_steps):
            # Eval metrics only in the report of the step that computed them: a Tune scheduler (ASHA) then sees
            # one result per evaluation, never a stale one.
            eval_metrics = _evaluate_and_report(engine, runtime, cfg, precision, pad_id, done, train_metrics,
                                                history, tracker)
            if is_main and eval_metrics:
                bar.write(f"step {done}: eval_loss {eval_metrics['eval_loss']:.4f} "
                          f"eval_rewards/accuracies {eval_metrics['eval_rewards/accuracies']:.3f}")
        bar.update(1)
    bar.close()
    if start_step >= total_steps and not eval_skipped:  # resumed from the final checkpoint: its evaluation (or the export) failed
        eval_metrics = _evaluate_and_report(engine, runtime, cfg, precision, pad_id, total_steps, train_metrics,
                                            history, tracker)
    release_chunk_buffers()  # the lm-head's buffers kept from step to step: not needed for the export

    # ---- results and export (rank 0) ------------------------------------------------------------
    all_tokens = float(runtime.all_reduce_sum(torch.tensor([float(timed_tokens)]))[0])
    results = {
        "train": train_metrics,
        "eval": eval_metrics,
        "objective": objective.name,
        "num_steps": total_steps,
        "resumed_from_step": start_step,
        "global_batch_pairs": global_batch,
        "pairs_per_second": timed_steps * global_batch / timed_seconds if timed_seconds else None,
        "tokens_per_second": all_tokens / timed_seconds if timed_seconds else None,
        "wall_seconds": time.perf_counter() - wall_start,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mem_mb": peak_gpu_mem_mb(runtime.device),
        "cpu_wait": cpu_wait.summary(timed_seconds),
        "quarantined": data_stats["quarantined"],
        "data": data_stats,
        "precision": precision,
        "fast_path": fast_path.record(),
        "world_size": runtime.world_size,
        "plan": plan,
        "parameters": {"trainable": trainable, "total": total},
        "hardware": hardware_summary(),
        "mlflow_run_id": tracker.run_id,
    }
    if not eval_metrics:
        del results["eval"]
        results["eval_skipped"] = eval_skipped or "no eval batches (train.eval_max_batches=0?); nothing was evaluated"
    if is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps(history, indent=1))
        if cfg.export.save_model:  # with LoRA: the adapter (+ base weights for 'tiny'), see export_model
            export_model(engine.module, tokenizer, out / "model")
            results["model_dir"] = str((out / "model").resolve())
        if cfg.export.merge_lora:  # config validation guarantees LoRA here
            export_merged(engine.module, tokenizer, out / "merged")
            results["merged_dir"] = str((out / "merged").resolve())
        write_results(out / "results.json", results)
        tracker.finish(cfg, history, out, engine.module, tokenizer)
        uploaded = upload_from_other_host(out)  # a URI output_dir whose driver runs on another host
        if uploaded is not None:
            print(f"[orpo-ray] rank 0 uploaded {uploaded} files from {out} (the driver runs on another host)", flush=True)
    return results


def _evaluate_and_report(engine, runtime, cfg: Config, precision: str, pad_id: int, step: int, train_metrics: dict,
                         history: list, tracker) -> dict:
    eval_metrics = evaluate(engine.model, runtime, cfg, precision, pad_id)
    if eval_metrics:  # empty when no rank had an eval batch (train.eval_max_batches=0)
        history.append({"step": step, **eval_metrics})
        tracker.log_metrics(eval_metrics, step=step)
    runtime.report({"step": step, **train_metrics, **eval_metrics})
    return eval_metrics


def _micro_batches(runtime: WorkerRuntime, start_micro: int):
    """Endless micro-batches across epochs, starting after `start_micro` (resume lands on the same batch)."""
    per_epoch = runtime.micro_batches_per_epoch()
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        yield from itertools.islice(runtime.train_batches(epoch), skip, None)
        epoch, skip = epoch + 1, 0


def _inject_fault(cfg: Config, step: int) -> None:
    """Fault injection for the fault-tolerance test: die once, like a killed worker would."""
    marker = Path(cfg.output_dir) / f".fault_injected_step_{step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        print(f"[orpo-ray] fault injection: worker exits at step {step}", flush=True)
        os._exit(17)


def _start_tracker(cfg: Config, extras: dict, is_main: bool):
    from orpo_ray.tracking.run import RunTracker

    return RunTracker.for_worker(cfg, extras, is_main)
