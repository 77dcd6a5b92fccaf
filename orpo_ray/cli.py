"""`orpo-ray COMMAND CONFIG [key=value ...]` - the command-line entry point.

Commands:
  train        train with ORPO (through Ray Train; `--local` runs the same loop in this process)
  tune         sweep λ and the learning rate with Ray Tune (each trial a Ray Train run)
  eval         evaluate a trained model on held-out pairs
  bench        benchmark against TRL's ORPOTrainer
  evidence     SFT (λ = 0) vs ORPO on the same data: plots, table, MLflow parent + child runs
  data-report  what is in the data before you train on it
  plan         the resolved run (workers, precision, fast path, data, memory per worker) without starting it
  config       print every config key with its default and meaning
"""

from __future__ import annotations

import argparse
import json
import sys

from orpo_ray.config import ConfigError, describe, load_config, with_absolute_paths
from orpo_ray.console import set_verbose, verbose
from orpo_ray.data.records import DamagedFileError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. orpo.beta=0.2 train.max_steps=50")
    p.add_argument("--verbose", action="store_true",
                   help="every progress-bar refresh and Ray Data's per-dataset INFO lines (quiet by default)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags may come before or after the key=value overrides (`train CONFIG a=1 --local b=2`)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(getattr(args, "overrides", []) or []) + rest
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orpo-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with ORPO")
    _add_config_args(train)
    train.add_argument("--local", action="store_true", help="run the loop in this process (1 worker, no Ray)")
    plan = sub.add_parser("plan", help="show the resolved run and its memory estimate without starting it")
    _add_config_args(plan)
    plan.add_argument("--local", action="store_true", help="plan `train --local` (in-process, no DeepSpeed)")
    for name, help_text in (("tune", "sweep λ x learning rate with Ray Tune"), ("eval", "evaluate a model"),
                            ("bench", "benchmark against TRL"), ("data-report", "report on the data"),
                            ("evidence", "SFT vs ORPO evidence runs")):
        _add_config_args(sub.add_parser(name, help=help_text))
    sub.add_parser("config", help="list every config key, its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "config":
        for key, default, help_text in describe():
            print(f"{key:42s} {default:24s} {help_text}")
        return 0
    if getattr(args, "verbose", False):
        set_verbose()
    try:
        cfg = with_absolute_paths(load_config(args.config, args.overrides))
    except ConfigError as e:
        print(f"orpo-ray: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "train" and args.local and argv is None:
        _restart_as_the_workers_start(cfg)

    from orpo_ray.output_staging import staged_output

    try:
        with staged_output(cfg) as cfg:  # a URI output_dir: write locally, upload at the end
            _dispatch(args, cfg, argv)
    except ConfigError as e:  # e.g. re-running an output_dir with a different config, or one in use
        print(f"orpo-ray: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DamagedFileError) as e:
        # A path the user gave (data file, model directory) is missing or a data file is damaged: the message names
        # the file and the key, and a traceback would only bury it. --verbose keeps the traceback.
        if verbose():
            raise
        print(f"orpo-ray: input error: {e} (--verbose shows the traceback)", file=sys.stderr)
        return 2
    return 0


def _restart_as_the_workers_start(cfg) -> None:
    """`train --local` from the command line runs on the malloc a local Ray instance's workers get (jemalloc by
    default, orpo_ray/allocator.py) and with their OpenMP spin count (orpo_ray/omp_wait.py), so the two ways of
    running train alike: a process reads both when it starts, so this one starts again, same interpreter and
    arguments, with them in its environment. Once it has them (or the user exported their own), the new process
    keeps what it has."""
    import os

    from orpo_ray.launch.session import local_process_env

    env = local_process_env(cfg)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _dispatch(args: argparse.Namespace, cfg, argv: list[str] | None) -> None:
    if args.command == "train":
        if args.local:
            from orpo_ray.launch.local import run_local

            results = run_local(cfg)
        else:
            from orpo_ray.launch.trainer import run_training

            results = run_training(cfg)
        _print_summary(results)
    elif args.command == "plan":
        from orpo_ray.commands.plan import run_plan

        run_plan(cfg, local=args.local)
    elif args.command == "tune":
        from orpo_ray.launch.tune import run_sweep

        run_sweep(cfg)
    elif args.command == "eval":
        from orpo_ray.commands.eval import run_eval

        _print_summary(run_eval(cfg))
    elif args.command == "bench":
        from orpo_ray.commands.bench import run_bench

        run_bench(cfg)
    elif args.command == "evidence":
        from orpo_ray.commands.evidence import run_evidence

        run_evidence(cfg, command=" ".join(["orpo-ray", *(argv if argv is not None else sys.argv[1:])]))
    elif args.command == "data-report":
        from orpo_ray.commands.data_report import run_data_report

        run_data_report(cfg)


def _print_summary(results: dict) -> None:
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
    summary = {k: results.get("eval", {}).get(k) for k in keys}
    summary.update({k: results.get(k) for k in ("num_steps", "pairs_per_second", "wall_seconds", "peak_rss_mb",
                                                  "quarantined", "model_dir")})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
