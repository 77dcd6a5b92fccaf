"""GPU check: CUDA-capable unit tests, the family matrix (fast == plain) on the device, fp32 log-probs under bf16
autocast, fast path == plain, and a short training of a ~100M-parameter random-init Llama (plain vs fast path, the
fast path with Liger's fused lm-head where liger-kernel is importable, the fast path through Ray Train with
DeepSpeed ZeRO-2 as `orpo-ray train` runs it where ray and deepspeed are importable, TRL's ORPOTrainer where
importable), then ONE JSON summary on the last line of stdout (format: README, "GPU check").

    bash scripts/gpu_check.sh            # on a machine with one CUDA GPU (torch + transformers suffice)
    bash scripts/gpu_check.sh --cpu      # dry run on CPU with a tiny model: proves the script works end to end

Everything it could not do is listed under "skipped" with the reason, and everything that failed under "errors"
with the end of its traceback (the other legs still run: a device lease is too short to lose to one leg).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orpo_ray.forward.liger_lm_head import liger_problem  # noqa: E402 - after the path set-up above

# Dense bf16 tensor-core peaks (NVIDIA datasheets, no sparsity), matched against torch.cuda.get_device_name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0}
# Pure-torch unit tests that exercise the rules a GPU run depends on (they run on whatever device is present).
# FAMILY_TESTS run again with ORPO_TEST_DEVICE set to the device: every family's fast path == plain path there.
FAMILY_TESTS = ["tests/unit/test_families.py"]
UNIT_TESTS = ["tests/unit/test_gpu_rules.py", "tests/unit/test_logprobs.py", "tests/unit/test_loss.py",
              "tests/unit/test_efficiency.py", "tests/unit/test_precision.py", "tests/unit/test_liger_lm_head.py"]
MODELS = {  # ~99M parameters on GPU (14 layers x 7.1M + embeddings); a toy on CPU
    "cuda": {"hidden_size": 768, "num_hidden_layers": 14, "num_attention_heads": 12, "intermediate_size": 2048},
    "cpu": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 172},
}
FAST = ["efficiency.chunked_lm_head=true", "efficiency.prefix_sharing=true", "efficiency.packing=true"]
# The fast path is the default, so the plain leg names its switches off.
PLAIN = ["efficiency.chunked_lm_head=false", "efficiency.prefix_sharing=false", "efficiency.packing=false",
         "efficiency.fused_layers=false"]
# The fast path with Liger-Kernel's fused linear cross-entropy as the lm-head (CUDA + liger-kernel >= 0.8.2).
LIGER = FAST + ["efficiency.lm_head=liger", "scaling.use_gpu=true"]
# The fast path as `orpo-ray train` runs it on a cluster: Ray Train's worker (NCCL on a GPU), DeepSpeed ZeRO-2.
RAY_DEEPSPEED = FAST + ["deepspeed.enabled=true", "deepspeed.zero_stage=2"]
# --ablation: the fast path with one part left out at a time, in-process, to find which part costs on this device.
ABLATION = {
    "fast-no-segment-attention": FAST + ["efficiency.segment_attention=false"],
    "fast-no-chunked-lm-head": FAST + ["efficiency.chunked_lm_head=false"],
    "layouts-dense-mask": FAST + ["efficiency.chunked_lm_head=false", "efficiency.segment_attention=false"],
    "chunked-lm-head-only": PLAIN + ["efficiency.chunked_lm_head=true"],
    "liger-no-segment-attention": LIGER + ["efficiency.segment_attention=false"],
}
# Its first loss against the in-process fast leg's: the same computation, kernel choice aside under bf16.
RAY_FIRST_LOSS_TOL = {"fp32": 1e-5, "bf16": 1e-2}


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"datasheet bf16 dense peak of {key}"
    return None, f"no bf16 peak known for {name!r} (pass --peak-tflops)"


def run_unit_tests(summary: dict, device: torch.device) -> None:
    if importlib.util.find_spec("pytest") is None:
        summary["skipped"]["unit_tests"] = "pytest is not installed"
        return
    summary["unit_tests"] = _pytest(UNIT_TESTS, {})
    summary["family_matrix"] = {**_pytest(FAMILY_TESTS, {"ORPO_TEST_DEVICE": device.type}), "device": device.type}


def _pytest(files: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    lines = proc.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith("FAILED")][:20]
    return {"files": files, "passed": proc.returncode == 0, "result": (lines[-1:] or [proc.stderr[-300:]])[0],
            **({"failures": failures} if failures else {})}


def numeric_checks(device: torch.device, summary: dict) -> None:
    """On the device: log-probs stay fp32 under bf16 autocast and match fp32; the fast path's loss equals plain."""
    from orpo_ray.config import load_config
    from orpo_ray.forward.layouts import make_collate, make_token_stats
    from orpo_ray.forward.logprobs import policy_forward
    from orpo_ray.modeling import load_model_and_tokenizer
    from orpo_ray.objectives.orpo import orpo_loss
    from orpo_ray.precision import autocast_context
    from orpo_ray.data.synthetic import generate_pairs
    from orpo_ray.data.tokenize import tokenize_pair

    base = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.intermediate_size=172"]
    cfg = load_config(None, base + PLAIN)
    model, tok = load_model_and_tokenizer(cfg.model)
    model.to(device)
    rows = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"], tok, 64, 32) for p in generate_pairs("sort", 8, 0)]

    def loss(config, precision):
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in make_collate(config, tok.pad_token_id)(rows).items()}
        with autocast_context(precision, device):
            out = policy_forward(model, batch, token_stats=make_token_stats(config, config.orpo.nll_on_prompt))
        return out, orpo_loss(out, config.orpo.beta)[0]

    fp32, fp32_loss = loss(cfg, "fp32")
    bf16, bf16_loss = loss(cfg, "bf16")
    _, fast_loss = loss(load_config(None, base + FAST), "fp32")
    summary["checks"] = {
        "bf16_logps_dtype": str(bf16.chosen_logps.dtype),
        "bf16_vs_fp32_loss_abs_diff": abs(float(bf16_loss - fp32_loss)),
        "fast_vs_plain_loss_abs_diff_fp32": abs(float(fast_loss - fp32_loss)),
    }
    passed = (bf16.chosen_logps.dtype == torch.float32 and summary["checks"]["bf16_vs_fp32_loss_abs_diff"] < 5e-2
              and summary["checks"]["fast_vs_plain_loss_abs_diff_fp32"] < 1e-4)
    if liger_problem(device) is None:  # Liger's fused lm-head on the same batch: the chunked head's loss
        _, liger_loss = loss(load_config(None, base + LIGER), "fp32")
        summary["checks"]["liger_vs_chunked_loss_abs_diff_fp32"] = abs(float(liger_loss - fast_loss))
        passed = passed and summary["checks"]["liger_vs_chunked_loss_abs_diff_fp32"] < 1e-5
    summary["checks"]["passed"] = passed


def training_legs(args, device: torch.device, summary: dict, work: Path) -> None:
    from orpo_ray.commands.bench import run_orpo_leg, run_trl_leg
    from orpo_ray.config import load_config
    from orpo_ray.data.synthetic import write_synthetic_split
    from orpo_ray.modeling import export_model, load_model_and_tokenizer, parameter_counts

    cuda = device.type == "cuda"
    shape = MODELS[device.type]
    overrides = [f"model.tiny.{k}={v}" for k, v in shape.items()] + [
        f"train.per_device_batch_size={args.batch}", f"train.max_steps={args.steps}", "train.scheduler=constant",
        "train.learning_rate=1e-4", "train.warmup_steps=0", "data.max_length=128", "data.max_prompt_length=64",
        "orpo.nll_on_prompt=true", f"scaling.use_gpu={str(cuda).lower()}"]
    cfg = load_config(None, overrides)
    model, tok = load_model_and_tokenizer(cfg.model)
    params = parameter_counts(model)[1]
    export_model(model, tok, work / "model")
    train, evals = write_synthetic_split(work / "data", "sort", args.steps * args.batch + args.batch, 64, 0)
    precision = "bf16" if cuda else "fp32"
    spec = {"config": cfg.to_dict(), "model_dir": str(work / "model"), "train": str(train), "trl_train": str(train),
            "eval": str(evals), "precision": precision}
    legs = [("orpo-plain", run_orpo_leg, PLAIN), ("orpo-fast", run_orpo_leg, FAST)]
    liger_skip = liger_problem(device)
    if liger_skip is None:
        legs.append(("orpo-liger", run_orpo_leg, LIGER))
    else:
        summary["skipped"]["liger"] = liger_skip
    if args.ablation:
        legs += [(name, run_orpo_leg, extra) for name, extra in ABLATION.items()
                 if liger_skip is None or not name.startswith("liger")]
    if args.only_in_process:
        summary["skipped"]["ray_deepspeed"] = summary["skipped"]["trl"] = "--only-in-process"
    else:
        missing = [name for name in ("ray", "deepspeed") if importlib.util.find_spec(name) is None]
        if missing:
            summary["skipped"]["ray_deepspeed"] = f"{' and '.join(missing)} not installed"
        else:
            legs.append(("orpo-ray-deepspeed", run_orpo_leg, RAY_DEEPSPEED))
        if importlib.util.find_spec("trl") is not None:
            legs.append(("trl", run_trl_leg, []))
        else:
            summary["skipped"]["trl"] = "trl is not installed"
    peak, peak_source = peak_tflops(summary["device_name"], args.peak_tflops) if cuda else (None, "CPU run")
    summary.update(parameters=params, precision=precision, steps=args.steps, batch_pairs=args.batch,
                   bf16_peak_tflops=peak, peak_source=peak_source, legs={})
    for name, fn, extra in legs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            result = fn({**spec, "name": name, "work": str(work / name), "overrides": extra,
                         "ray": name.startswith("orpo-ray")})
        except Exception:  # noqa: BLE001 - recorded, and the summary fails; the other legs still run
            summary["errors"][name] = traceback.format_exc()[-2000:]
            continue
        in_worker = result.get("worker_peak_gpu_mem_mb")  # a Ray leg trains in Ray's worker, not here
        leg = {"pairs_per_second": result["pairs_per_second"], "tokens_per_second": result["tokens_per_second"],
               "wall_seconds": round(time.perf_counter() - start, 2), "first_loss": result["losses"][0],
               "last_loss": result["losses"][-1],
               "peak_gpu_mem_gb": (in_worker / 1024 if in_worker is not None
                                   else torch.cuda.max_memory_allocated() / 1024**3 if cuda else None),
               **({"fast_path": result["fast_path"]} if result.get("fast_path") else {})}
        summary["legs"][name] = leg
    # MFU credits every leg with the plain algorithm's work (6 x params per token the plain layout processes),
    # so a layout that skips padding or shares prompts shows up as more pairs/s, not as inflated FLOPs.
    plain = summary["legs"].get("orpo-plain")
    tokens_per_pair = plain["tokens_per_second"] / plain["pairs_per_second"] if plain and plain["pairs_per_second"] else None
    for leg in summary["legs"].values():
        achieved = 6 * params * tokens_per_pair * leg["pairs_per_second"] if tokens_per_pair and leg["pairs_per_second"] else None
        leg["model_tflops"] = achieved / 1e12 if achieved else None
        leg["mfu"] = achieved / (peak * 1e12) if achieved and peak else None
    for name, key in (("orpo-liger", "liger_vs_chunked"), ("orpo-ray-deepspeed", "ray_deepspeed_vs_fast")):
        if name in summary["legs"] and "orpo-fast" in summary["legs"]:
            summary[key] = compare_legs(summary["legs"][name], summary["legs"]["orpo-fast"])
    if "ray_deepspeed_vs_fast" in summary:  # one worker, the same model, data and order: the same first step
        diff = summary["ray_deepspeed_vs_fast"]["first_loss_abs_diff"]
        summary["ray_deepspeed_first_loss_ok"] = diff < (RAY_FIRST_LOSS_TOL[precision])


def _training_in_a_temporary_directory(args, device: torch.device, summary: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="orpo_gpu_check_") as work:
        training_legs(args, device, summary, Path(work))


def compare_legs(leg: dict, ref: dict) -> dict:
    """`leg` relative to `ref`: speed and peak memory ratios, and how far apart their losses are."""
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    return {"pairs_per_second_ratio": ratio(leg["pairs_per_second"], ref["pairs_per_second"]),
            "peak_gpu_mem_ratio": ratio(leg["peak_gpu_mem_gb"], ref["peak_gpu_mem_gb"]),
            "first_loss_abs_diff": abs(leg["first_loss"] - ref["first_loss"]),
            "last_loss_abs_diff": abs(leg["last_loss"] - ref["last_loss"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry run on CPU with a tiny model (no GPU needed)")
    p.add_argument("--steps", type=int, default=None, help="training steps per leg (default 40 GPU, 3 CPU)")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 32 GPU, 4 CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 peak, if not in the table")
    p.add_argument("--skip-unit-tests", action="store_true", help="do not run the unit tests")
    p.add_argument("--ablation", action="store_true", help="also the fast path less one part at a time (ABLATION)")
    p.add_argument("--only-in-process", action="store_true", help="leave out the Ray + DeepSpeed and TRL legs")
    p.add_argument("--out", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    args.steps = args.steps or (40 if cuda else 3)
    args.batch = args.batch or (32 if cuda else 4)
    import transformers

    summary = {"device": device.type, "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
               "skipped": {}, "errors": {}}
    if not cuda and not args.cpu:
        summary["skipped"]["everything"] = "no CUDA GPU visible (torch.cuda.is_available() is False); use --cpu"
        print(json.dumps(summary))
        return 1
    if cuda:
        summary["bf16_supported"] = torch.cuda.is_bf16_supported()
        summary["cuda"] = torch.version.cuda
        attn = "flash_attn importable" if importlib.util.find_spec("flash_attn") else "flash_attn not installed"
        summary["skipped"]["flash_attention"] = f"not wired into the fast path yet ({attn}); SDPA is used"
    if args.skip_unit_tests:
        summary["skipped"]["unit_tests"] = "--skip-unit-tests"
    else:
        run_unit_tests(summary, device)
    for name, section in (("numeric_checks", lambda: numeric_checks(device, summary)),
                          ("training_legs", lambda: _training_in_a_temporary_directory(args, device, summary))):
        try:
            section()
        except Exception:  # noqa: BLE001 - recorded; the summary is still printed and fails
            summary["errors"][name] = traceback.format_exc()[-2000:]
    ok = (summary.get("checks", {}).get("passed", False) and not summary["errors"]
          and all(summary.get(k, {}).get("passed", True) for k in ("unit_tests", "family_matrix"))
          and summary.get("ray_deepspeed_first_loss_ok", True))
    summary["passed"] = ok
    text = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
