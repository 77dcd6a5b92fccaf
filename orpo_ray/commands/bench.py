"""`orpo-ray bench CONFIG`: TRL against orpo-ray, same model, data, batch, max_length, steps and objective.

The TRL leg runs the trainer of the config's ``objective``: ORPOTrainer for orpo, CPOTrainer with
``loss_type="simpo"`` (simpo) or ``"sigmoid"`` (cpo), with the objective's beta / gamma / alpha.

What is compared, and how it is kept fair:
  * One local model directory: the tiny Llama of ``model.tiny`` (fixed seed) with a byte-level BPE tokenizer of
    ``bench.vocab_size`` trained on the HH text, written with ``save_pretrained``; every leg loads it.
  * The same pairs in the same order: only HH pairs that need no truncation at ``data.max_length`` and whose
    response tokens are the same whether tokenized alone (orpo-ray) or jointly with the prompt (TRL) are used;
    TRL reads them sequentially in exactly the order orpo-ray's in-process runtime visits them.
  * Same optimiser settings (AdamW, constant LR, no warm-up, clip 1.0) and objective hyper-parameters. ORPO:
    the NLL over prompt + chosen response on both sides (``orpo.nll_on_prompt: true`` is TRL's definition);
    SimPO / CPO: over the chosen response (TRL's CPOTrainer masks the prompt, as orpo-ray does for them).
  * Each leg runs in its own subprocess (``python -m orpo_ray.commands.bench --leg SPEC.json --out RESULT.json``), so its
    peak RSS is its own. Each runs on the malloc its command would: an in-process orpo-ray leg on the one
    ``train --local`` restarts itself under (``scaling.allocator``, jemalloc by default), a Ray leg's worker on the
    one the run gives it, TRL on glibc's, as its users run it. Speed is the optimisation loop only, the first (warm-up) step excluded; for TRL from
    step begin to step end (its data loading is *not* counted, which favours TRL slightly).

Writes ``output_dir/bench.json`` and prints the table, the ratios and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from orpo_ray.config import Config, config_from_dict, parse_override, set_dotted
from orpo_ray.data.order import TrainingOrder
from orpo_ray.objectives import build_objective
from orpo_ray.precision import cpu_has_fast_bf16, hardware_summary


# ------------------------------------------------------------------------------------------ machine peak
def matmul_gflops(size: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Measured GFLOP/s of a size x size matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up (oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------------- shared inputs
def prepare_inputs(cfg: Config, work: Path) -> dict:
    """Tokenizer + model directory and the pair files every leg reads. Returns paths and data statistics."""
    from orpo_ray.data.records import read_pairs
    from orpo_ray.data.tokenize import tokenize_pair
    from orpo_ray.embedded_tokenizer import train_bpe_tokenizer
    from orpo_ray.modeling import build_tiny_model, parameter_counts

    pairs, _ = read_pairs(cfg.data.train_path, "hh")
    tok = train_bpe_tokenizer((t for p in pairs for t in (p.prompt, p.chosen, p.rejected)), cfg.bench.vocab_size)
    model_dir = work / "model"
    model = build_tiny_model(cfg.model, tok)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)

    d, b = cfg.data, cfg.train.per_device_batch_size
    wanted = cfg.bench.num_pairs or cfg.train.max_steps * b
    kept, rows, skipped = [], [], {"truncated": 0, "joint_tokenization_differs": 0}
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731

    def skip_reason(p, row) -> str | None:
        if row["prompt_tokens_cut"] or row["response_tokens_cut"]:
            return "truncated"
        n = len(enc(p.prompt))
        if any(enc(p.prompt + r)[:n] != enc(p.prompt) or enc(p.prompt + r)[n:] != enc(r) for r in (p.chosen, p.rejected)):
            return "joint_tokenization_differs"
        return None

    for p in pairs:
        row = tokenize_pair(p.prompt, p.chosen, p.rejected, tok, d.max_length, d.max_prompt_length)
        # consecutive: the pairs as they come, both sides truncating the long ones their own way
        reason = skip_reason(p, row) if cfg.bench.pairs == "clean" else None
        if reason:
            skipped[reason] += 1
            continue
        kept.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
        rows.append(row)
        if len(kept) == wanted + b:  # + one eval batch
            break
    train, evals, train_rows = kept[:wanted], kept[wanted:], rows[:wanted]
    if len(train) < wanted or not evals:
        raise ValueError(f"only {len(kept)} usable pairs in {cfg.data.train_path}, need {wanted + b}")
    # TRL gets the rows in the order orpo-ray's loop visits them in epoch 0 (data/order.py, one rank).
    order = [int(i) for batch in TrainingOrder.for_run(cfg.train, 1).rank_positions(len(train), 0, 0) for i in batch]
    paths = {"model_dir": str(model_dir), "train": str(work / "train.jsonl"),
             "trl_train": str(work / "trl_train.jsonl"), "eval": str(work / "eval.jsonl")}
    for key, items in (("train", train), ("trl_train", [train[i] for i in order]), ("eval", evals)):
        Path(paths[key]).write_text("".join(json.dumps(x) + "\n" for x in items))
    steps = [[train_rows[i] for i in order[s * b:(s + 1) * b]] for s in range(cfg.train.max_steps)]
    return {**paths, "skipped": skipped, "pairs": len(train), "parameters": parameter_counts(model)[1],
            "step_flops": [_step_flops(cfg, model.config, batch) for batch in steps],
            "step_tokens": [sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                for r in batch) for batch in steps]}


def _step_flops(cfg: Config, mc, batch: list[dict]) -> float:
    """FLOPs of one training step of the *plain* algorithm on the non-pad tokens (fwd + bwd = 3 x fwd).

    Per token 2 x (non-embedding weights incl. the lm-head); attention scores and values 4 x len x hidden per
    layer (causal: half of a full len x len). Both contenders are credited with this same work, so the
    achieved rate is comparable across legs and against the measured matmul peak.
    """
    h, kv = mc.hidden_size, mc.num_key_value_heads * (mc.hidden_size // mc.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * mc.intermediate_size
    weights = mc.num_hidden_layers * layer + h * mc.vocab_size
    total = 0.0
    for r in batch:
        for resp in ("chosen_ids", "rejected_ids"):
            n = len(r["prompt_ids"]) + len(r[resp])
            total += 3 * (2 * weights * n + mc.num_hidden_layers * 2 * n * n * h)
    return total


# ------------------------------------------------------------------------------------------------- legs
def _apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(values, key, value)
    return values


def orpo_leg_config(spec: dict) -> Config:
    """The leg's config: the bench's, the leg's files and settings, its overrides. `spec` is left as it was (a
    shallow copy let one leg's overrides reach the next leg run in the same process, as gpu_check runs them)."""
    values = _apply_overrides(copy.deepcopy(spec["config"]), [
        f"output_dir={spec['work']}", f"model.name_or_path={spec['model_dir']}", "model.tokenizer=null",
        f"data.train_path={spec['train']}", f"data.eval_path={spec['eval']}", "data.format=pairs",
        "tracking.enabled=false", "export.save_model=false", "train.progress_bar=false", "train.log_interval=1",
        "train.eval_max_batches=1", "train.eval_interval=0", "train.checkpoint_interval=0",
        f"train.precision={spec['precision']}", *spec.get("overrides", []),
    ])
    return config_from_dict(values, where=f"bench leg {spec['name']}")


def run_orpo_leg(spec: dict) -> dict:
    """orpo-ray's own loop in this process (LocalRuntime), or under Ray when the leg asks for workers. A Ray leg's
    process is the driver of `orpo-ray train`, as light as the real one: no model code is imported here."""
    cfg = orpo_leg_config(spec)
    if cfg.scaling.num_workers > 1 or spec.get("ray"):
        from orpo_ray.launch.trainer import run_training

        results = run_training(cfg)
    else:
        from orpo_ray.train.loop import train_loop_per_worker

        results = train_loop_per_worker(cfg.to_dict())
    history = json.loads((Path(cfg.output_dir) / "history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    return {"pairs_per_second": results["pairs_per_second"], "tokens_per_second": results["tokens_per_second"],
            "losses": losses, "precision": results["precision"], "world_size": results["world_size"],
            "fast_path": results.get("fast_path"), "worker_peak_rss_mb": results["peak_rss_mb"],
            "worker_peak_gpu_mem_mb": results.get("peak_gpu_mem_mb"),
            "cpu_wait": results.get("cpu_wait")}


def trl_trainer_for(cfg: Config) -> tuple[type, type, dict]:
    """(TRL trainer class, its config class, objective arguments) for ``cfg.objective``."""
    if cfg.objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, {"beta": cfg.orpo.beta}
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if cfg.objective == "simpo":
        s = cfg.simpo
        return CPOTrainer, CPOConfig, {"loss_type": "simpo", "beta": s.beta, "simpo_gamma": s.gamma,
                                       "cpo_alpha": s.alpha}
    return CPOTrainer, CPOConfig, {"loss_type": "sigmoid", "beta": cfg.cpo.beta, "cpo_alpha": cfg.cpo.alpha}


def run_trl_leg(spec: dict) -> dict:
    """TRL's trainer for the objective on the same model directory and pairs, read sequentially in orpo-ray's order."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from orpo_ray.modeling import resolve_attn_implementation

    cfg = config_from_dict(spec["config"])
    trl_trainer, trl_config, objective_args = trl_trainer_for(cfg)
    t = cfg.train
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], local_files_only=True, dtype=torch.float32,
                                                 attn_implementation=resolve_attn_implementation(cfg.model, spec["model_dir"]))
    rows = [json.loads(line) for line in Path(spec["trl_train"]).read_text().splitlines()]
    timing = {"seconds": 0.0, "steps": 0, "tokens": 0, "step_tokens": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timing["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:  # the first step is warm-up
                timing["seconds"] += time.perf_counter() - timing["start"]
                timing["steps"] += 1
                timing["tokens"] += timing["step_tokens"]
            timing["step_tokens"] = 0

    class Trainer(trl_trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):
            timing["step_tokens"] += int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    args = trl_config(
        output_dir=spec["work"], per_device_train_batch_size=t.per_device_batch_size, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], max_grad_norm=t.max_grad_norm,
        max_length=cfg.data.max_length, logging_steps=1, report_to="none", **objective_args,
        save_strategy="no", use_cpu=not cfg.scaling.use_gpu, bf16=spec["precision"] == "bf16", seed=t.seed,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                      callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    secs = timing["seconds"]
    return {"pairs_per_second": timing["steps"] * t.per_device_batch_size / secs if secs else None,
            "tokens_per_second": timing["tokens"] / secs if secs else None, "losses": losses,
            "precision": spec["precision"], "world_size": 1}


def _leg_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(config_from_dict(spec["config"]).train.seed)
    result = (run_trl_leg if spec["kind"] == "trl" else run_orpo_leg)(spec)
    # A Ray leg trains in a Ray worker process: its peak counts too (Ray's own daemons are not counted).
    result["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                result.get("worker_peak_rss_mb") or 0.0)
    Path(out_path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def leg_env(spec: dict) -> dict | None:
    """An in-process orpo-ray leg runs as `train --local` does, on the malloc a local instance's workers get
    (scaling.allocator); a Ray leg's workers get it from the run itself, and TRL runs as its users run it."""
    if spec["kind"] != "orpo":
        return None
    from orpo_ray.launch.session import local_process_env

    cfg = config_from_dict(_apply_overrides(dict(spec["config"]), spec.get("overrides", [])))
    return None if cfg.scaling.num_workers > 1 or spec.get("ray") else local_process_env(cfg)


def run_leg_once(spec: dict, work: Path, repeat: int) -> tuple[dict | None, str | None]:
    """Run one leg once, in its own subprocess (its own peak RSS): (result, None) or (None, error)."""
    result_path = work / f"{spec['name']}.result.json"
    # Each repeat trains in its own, emptied output_dir: `orpo-ray train` does not retrain a finished run's
    # directory (it reports the finished results), so a reused one would repeat one measurement.
    run_dir = Path(spec["work"]) / f"run{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    spec_path = work / f"{spec['name']}.{repeat}.spec.json"
    spec_path.write_text(json.dumps({**spec, "work": str(run_dir)}))
    started, clock = time.time(), time.perf_counter()  # when (epoch seconds, for the order) and how long
    proc = subprocess.run([sys.executable, "-m", "orpo_ray.commands.bench", "--leg", str(spec_path), "--out",
                           str(result_path)], capture_output=True, text=True, env=leg_env(spec))
    if proc.returncode != 0:
        return None, proc.stderr[-3000:]
    return {**json.loads(result_path.read_text()), "round": repeat, "started_at": started,
            "leg_wall_seconds": time.perf_counter() - clock}, None


def run_rounds(specs: list[dict], work: Path, repeats: int) -> dict[str, tuple[list[dict], str | None]]:
    """Every leg once per round, `repeats` rounds: {leg name: (its runs, error or None)}.

    Why rounds and not each leg's repeats back to back: on a shared VM the speed of the same leg drifted by
    1.5x within minutes (session 16: one Ray leg ran 12.46-18.66 pairs/s in 15 minutes, idle). Back to back, a slow
    window lands on all repeats of whichever legs run in it; in rounds, each leg gets runs spread over the whole
    bench, so the fastest of each is taken from comparable chances. A leg that fails is not run again."""
    outcome: dict[str, tuple[list[dict], str | None]] = {spec["name"]: ([], None) for spec in specs}
    rounds = max(1, repeats)
    for repeat in range(rounds):
        for spec in specs:
            runs, error = outcome[spec["name"]]
            if error is not None:
                continue
            result, error = run_leg_once(spec, work, repeat)
            outcome[spec["name"]] = (runs + [result] if result else runs, error)
            if result:  # progress: the table comes when every round is done
                print(f"[bench] round {repeat + 1}/{rounds} {spec['name']}: {result['pairs_per_second'] or 0:.2f} "
                      f"pairs/s, peak {result['peak_rss_mb']:.0f} MB", flush=True)
    return outcome


def run_bench(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    work = out / "bench_work"
    work.mkdir(parents=True, exist_ok=True)
    if cfg.bench.families:
        from orpo_ray.commands.families import run_family_bench

        return run_family_bench(cfg, work)
    if not cfg.bench.legs:
        raise ValueError("bench.legs is empty: list the contenders (see configs/bench/)")
    if cfg.train.max_steps is None or cfg.train.max_steps < 2:
        raise ValueError("bench needs train.max_steps >= 2 (the first step is warm-up and not timed)")
    hardware = hardware_summary()
    load_before = os.getloadavg()[0]
    peak = {"fp32": matmul_gflops(cfg.bench.matmul_size, torch.float32),
            "bf16": matmul_gflops(cfg.bench.matmul_size, torch.bfloat16)}
    print(f"[bench] {hardware['cpu']} ({hardware['cpu_capability']}, {hardware['threads']} threads); "
          f"{cfg.bench.matmul_size}^2 matmul: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s",
          flush=True)
    inputs = prepare_inputs(cfg, work)
    timed_flops = sum(inputs["step_flops"][1:])
    timed_pairs = (cfg.train.max_steps - 1) * cfg.train.per_device_batch_size
    legs = {leg["name"]: {"name": leg["name"], "kind": leg["kind"], "ray": bool(leg.get("ray"))}
            for leg in cfg.bench.legs}
    specs = []
    for leg in cfg.bench.legs:
        slow_bf16 = leg.get("precision") == "bf16" and not cfg.scaling.use_gpu and not cpu_has_fast_bf16()
        if slow_bf16:  # e.g. AVX2-only EPYCs: bf16 matmul runs 100-1000x slower than fp32; a leg would take hours
            reason = (f"this CPU has no fast bf16 ({hardware['cpu_capability']}): the bf16 matmul ran at "
                      f"{peak['bf16']:.0f} GFLOP/s vs fp32 {peak['fp32']:.0f}")
            print(f"[bench] leg {leg['name']} skipped: {reason}", flush=True)
            legs[leg["name"]]["skipped"] = reason
            continue
        specs.append({**leg, **{k: inputs[k] for k in ("model_dir", "train", "trl_train", "eval")},
                      "config": cfg.to_dict(), "work": str(work / leg["name"]),
                      "precision": leg.get("precision", "fp32")})
    overrides = {spec["name"]: spec.get("overrides", []) for spec in specs}
    for name, (runs, error) in run_rounds(specs, work, cfg.bench.repeats).items():
        if error is not None:
            print(f"[bench] leg {name} failed:\n{error}", flush=True)
            legs[name]["error"] = error
            continue
        # The fastest run stands for the leg (load from others only slows a run down); memory is the worst run's.
        r = legs[name]
        r.update({"overrides": overrides[name], **max(runs, key=lambda x: x["pairs_per_second"] or 0.0),
                  "pairs_per_second_runs": [x["pairs_per_second"] for x in runs],
                  "started_at_runs": [x["started_at"] for x in runs],
                  # the Ray tax, round by round: the share of time the trainer's threads waited for a CPU (cpu_wait.py)
                  "cpu_wait_share_runs": [_cpu_wait_share(x) for x in runs],
                  "peak_rss_mb": max(x["peak_rss_mb"] for x in runs)})
        r["final_loss"] = r["losses"][-1] if r["losses"] else None
        r["gflops"] = timed_flops / (timed_pairs / r["pairs_per_second"]) / 1e9 if r["pairs_per_second"] else None
        print(f"[bench] {_row(r)}", flush=True)
    legs = [legs[leg["name"]] for leg in cfg.bench.legs]
    report = {"hardware": hardware, "matmul_peak_gflops": peak, "legs": legs, "ratios": _ratios(legs),
              "data": {k: inputs[k] for k in ("pairs", "skipped", "step_tokens")},
              "parameters": inputs["parameters"],
              "setting": {"vocab_size": cfg.bench.vocab_size, "tiny": cfg.to_dict()["model"]["tiny"],
                          "batch": cfg.train.per_device_batch_size, "max_length": cfg.data.max_length,
                          "steps": cfg.train.max_steps, "timed_steps": cfg.train.max_steps - 1,
                          "objective": cfg.objective,
                          "nll_on_prompt": build_objective(cfg).nll_on_prompt},
              "note": f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (above 0.5 other "
                      "work shared the cores); short runs, first step excluded, fastest of bench.repeats rounds per leg"}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(_table(report), flush=True)
    return report


def _ratios(legs: list[dict]) -> dict:
    ok = [r for r in legs if r.get("pairs_per_second")]
    trl = [r for r in ok if r["kind"] == "trl"]
    ours = [r for r in ok if r["kind"] == "orpo"]
    if not trl or not ours:
        return {}
    best_trl = max(trl, key=lambda r: r["pairs_per_second"])
    best = max(ours, key=lambda r: r["pairs_per_second"])
    ratios = {"best_trl": best_trl["name"], "best_orpo": best["name"],
              "speedup_pairs_per_second": best["pairs_per_second"] / best_trl["pairs_per_second"],
              "peak_rss_ratio": best["peak_rss_mb"] / best_trl["peak_rss_mb"],
              "peak_rss_ratio_vs_smallest_trl": best["peak_rss_mb"] / min(r["peak_rss_mb"] for r in trl)}
    for r in (r for r in ours if r.get("ray")):
        ratios.setdefault("through_ray", {})[r["name"]] = _through_ray(r, best_trl, ours)
    trl32 = next((r for r in trl if r["precision"] == "fp32"), None)
    for r in ours:
        # TRL logged loss 0.0 on bench.pairs=consecutive (truncated HH pairs): no relative difference to take.
        if trl32 and r["precision"] == "fp32" and r["losses"] and trl32["losses"] and all(trl32["losses"]):
            n = min(len(r["losses"]), len(trl32["losses"]))
            ratios.setdefault("loss_vs_trl_fp32", {})[r["name"]] = {
                "final_relative_difference": abs(r["losses"][-1] - trl32["losses"][-1]) / abs(trl32["losses"][-1]),
                "max_step_relative_difference": max(abs(a - b) / abs(b) for a, b in
                                                    zip(r["losses"][:n], trl32["losses"][:n]))}
    return ratios


def _through_ray(ray_leg: dict, best_trl: dict, ours: list[dict]) -> dict:
    """A leg trained through Ray against TRL's best leg and against its in-process twin (same overrides, same
    precision as resolved): how `orpo-ray train` users fare, and what Ray costs. Besides fastest against fastest,
    the ratio of each round's two runs: they ran minutes apart, so a drift of the machine between rounds, which can
    make one leg's fastest run come from a faster spell than the other's, cancels out."""
    out = {"speedup_vs_best_trl": ray_leg["pairs_per_second"] / best_trl["pairs_per_second"],
           "peak_rss_vs_best_trl": ray_leg["peak_rss_mb"] / best_trl["peak_rss_mb"]}
    twin = next((r for r in ours if not r.get("ray") and r["precision"] == ray_leg["precision"]
                 and sorted(r.get("overrides") or []) == sorted(ray_leg.get("overrides") or [])), None)
    if twin is not None:
        out.update(in_process_leg=twin["name"], vs_in_process=ray_leg["pairs_per_second"] / twin["pairs_per_second"],
                   vs_in_process_by_round=[a / b for a, b in zip(ray_leg.get("pairs_per_second_runs") or [],
                                                                   twin.get("pairs_per_second_runs") or []) if a and b])
    return out


def _cpu_wait_share(run: dict) -> float | None:
    """An orpo run's cpu_wait share; None for TRL's runs and where the kernel keeps no schedstat."""
    return (run.get("cpu_wait") or {}).get("share")


def _row(r: dict) -> str:
    wait = _cpu_wait_share(r)
    return (f"{r['name']:24s} {r['pairs_per_second']:8.2f} pairs/s {r['tokens_per_second']:9.0f} tok/s "
            f"{r['peak_rss_mb']:7.0f} MB  loss {r['final_loss']:.4f}  {r['gflops']:6.1f} GFLOP/s"
            + (f"  CPU wait {wait:.1%}" if wait is not None else ""))


def _table(report: dict) -> str:
    lines = [f"CPU: {report['hardware']['cpu']} | matmul peak fp32 {report['matmul_peak_gflops']['fp32']:.0f} / "
             f"bf16 {report['matmul_peak_gflops']['bf16']:.0f} GFLOP/s | {report['note']}",
             f"{'leg':24s} {'pairs/s':>8s} {'tokens/s':>9s} {'peak RSS':>10s}  {'final loss':>10s}  {'GFLOP/s':>7s}"]
    lines += [f"{r['name']:24s} FAILED" if "error" in r else f"{r['name']:24s} skipped: {r['skipped']}"
              if "skipped" in r else _row(r) for r in report["legs"]]
    lines.append(json.dumps(report["ratios"], indent=1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one benchmark leg in its own process (used by run_bench)")
    parser.add_argument("--leg", required=True, help="leg spec JSON written by run_bench")
    parser.add_argument("--out", required=True, help="where to write the leg's result JSON")
    args = parser.parse_args(argv)
    _leg_main(args.leg, args.out)


if __name__ == "__main__":
    main()
