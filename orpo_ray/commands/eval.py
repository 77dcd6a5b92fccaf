"""`orpo-ray eval CONFIG eval.checkpoint=PATH`: how a trained model ranks held-out preference pairs.

On the config's eval pairs (the same split and truncation as training) this reports, under TRL's names with
the `eval_` prefix, what `train/evaluation.evaluate` reports during training - preference accuracy (share of pairs
whose chosen log-prob beats the rejected one), `eval_logps/chosen|rejected`, the NLL and the other parts of the
config's `objective` at its beta - plus `eval_logps/margins`, and greedy generations for the first
`eval.num_generations` prompts. Writes `eval.json` to `output_dir`; logs to MLflow when tracking is on.

`eval_logps/margins` = mean(chosen - rejected mean log-prob). TRL's `rewards/margins` is that times beta, so it
is 0 for an SFT model (beta = 0) whatever the model does; the log-prob margin compares SFT and ORPO fairly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from orpo_ray.config import Config, is_uri
from orpo_ray.forward.fast_path import resolve_fast_path
from orpo_ray.modeling import is_adapter_dir, load_model_and_tokenizer
from orpo_ray.objectives import build_objective
from orpo_ray.precision import select_precision
from orpo_ray.results import MARGIN_KEY, logp_margin, no_eval_reason
from orpo_ray.train.evaluation import evaluate
from orpo_ray.train.runtime import LocalRuntime


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory (config.json), a LoRA adapter directory (adapter_config.json), or a run's output_dir
    whose `model/` is one of those; a URI (s3://, gs://, file://, ...) is downloaded first."""
    if is_uri(str(path)):
        from orpo_ray.output_staging import download_model

        return download_model(str(path))
    p = Path(path).expanduser().resolve()
    for candidate in (p, p / "model"):
        if (candidate / "config.json").is_file() or is_adapter_dir(candidate):
            return candidate
    raise FileNotFoundError(
        f"eval.checkpoint={str(path)!r}: neither it nor its model/ subdirectory holds a saved model (config.json) "
        "or LoRA adapter (adapter_config.json); pass one of those or the output_dir of a finished `orpo-ray train` run"
    )


def eval_config(cfg: Config, model_dir: Path) -> Config:
    """The run's config pointed at the saved model (and its tokenizer); training pairs are not needed.

    LoRA is switched off: a LoRA run's export is an adapter directory, which `modeling.load_adapter_model` loads
    onto its base with the trained adapters; the run's model.lora.enabled would ask for fresh ones on top.
    """
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=str(model_dir), tokenizer=str(model_dir),
                                  lora=dataclasses.replace(cfg.model.lora, enabled=False)),
        export=dataclasses.replace(cfg.export, merge_lora=False),  # eval exports nothing; keeps the config valid
        # prepare_data tokenizes train and eval; one train pair keeps that cheap (the eval split does not
        # depend on it: split_for_eval runs before max_train_pairs is applied).
        data=dataclasses.replace(cfg.data, max_train_pairs=1),
    )


@torch.no_grad()
def greedy_generations(model, tokenizer, rows: list[dict], max_new_tokens: int, device: torch.device) -> list[dict]:
    """Greedy continuation of each row's prompt, with the pair's chosen/rejected for comparison."""
    model.eval()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    out = []
    for row in rows:
        ids = torch.tensor([row["prompt_ids"]], device=device)
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        out.append({
            "prompt": decode(row["prompt_ids"]),
            "generation": decode(generated[0, ids.shape[1]:].tolist()),
            "chosen": decode(row["chosen_ids"]),
            "rejected": decode(row["rejected_ids"]),
        })
    return out


def run_eval(cfg: Config, *, mlflow_uri: str | None = None, parent_run_id: str | None = None) -> dict:
    """Evaluate `cfg.eval.checkpoint` on `cfg`'s eval pairs; returns (and writes as eval.json) the results."""
    if cfg.eval.checkpoint is None:
        raise ValueError("orpo-ray eval needs a model: add eval.checkpoint=PATH (a model dir or a run's output_dir)")
    model_dir = resolve_checkpoint(cfg.eval.checkpoint)
    cfg = eval_config(cfg, model_dir)
    runtime = LocalRuntime(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.to(runtime.device)
    fast_path = resolve_fast_path(model, cfg)
    cfg = fast_path.apply(cfg)
    fast_path.fuse(model)
    for line in fast_path.lines():
        print(line, flush=True)
    data_stats = runtime.setup_data(cfg, tokenizer)
    if not data_stats["eval_pairs"]:
        raise ValueError(f"orpo-ray eval: {no_eval_reason(cfg)}")
    precision, _ = select_precision(cfg.train.precision, runtime.device)

    metrics = evaluate(model, runtime, cfg, precision, tokenizer.pad_token_id)
    metrics[f"eval_{MARGIN_KEY}"] = logp_margin(metrics)
    prompts = runtime.prepared.eval_rows[: cfg.eval.num_generations]
    results = {
        "checkpoint": str(model_dir),
        "objective": cfg.objective,
        "beta": build_objective(cfg).beta,
        "eval_pairs": data_stats["eval_pairs"],
        "precision": precision,
        "fast_path": fast_path.record(),
        "eval": metrics,
        "generations": greedy_generations(model, tokenizer, prompts, cfg.eval.max_new_tokens, runtime.device),
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    if cfg.tracking.enabled:
        _track(cfg, results, out / "eval.json", mlflow_uri, parent_run_id)
    return results


def _track(cfg: Config, results: dict, eval_json: Path, mlflow_uri: str | None, parent_run_id: str | None) -> None:
    from orpo_ray.tracking import make_tracker

    with make_tracker(cfg, uri=mlflow_uri) as tracker:
        tracker.start(cfg.tracking.experiment, run_name=f"eval-{Path(cfg.output_dir).name}",
                      tags={"kind": "eval", "checkpoint": results["checkpoint"]}, parent_run_id=parent_run_id)
        tracker.log_params({"eval": dataclasses.asdict(cfg.eval), f"{cfg.objective}.beta": results["beta"],
                            "eval_pairs": results["eval_pairs"]})
        tracker.log_metrics(results["eval"], step=0)
        tracker.log_artifact(eval_json)
