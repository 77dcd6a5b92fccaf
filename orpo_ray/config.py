"""Typed configuration: YAML files + dotted ``key=value`` overrides -> dataclasses.

Every field carries its default and a one-line meaning (``metadata["help"]``), in the style of TRL's
config dataclasses. The loader is strict on purpose: an unknown key or a value of the wrong type is an
error that names the key and the file, because a typo that silently falls back to a default (say
``orpo.bata=0.5``) wastes a whole run.

Pure module: no ray, no deepspeed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and where it came from."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a documented default (lists/dicts get a default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------- model
@dataclass
class TinyModelSection:
    """Architecture of the embedded default: a small Llama initialised from a fixed seed."""

    hidden_size: int = _f(128, "Width of the residual stream.")
    num_hidden_layers: int = _f(2, "Number of decoder layers.")
    num_attention_heads: int = _f(4, "Attention heads (head_dim = hidden_size / heads).")
    num_key_value_heads: Optional[int] = _f(None, "KV heads for GQA; null means = num_attention_heads.")
    intermediate_size: int = _f(344, "MLP width.")
    max_position_embeddings: int = _f(2048, "Longest sequence the rotary embedding is set up for.")
    init_seed: int = _f(0, "Seed of the random initialisation (same seed, same weights).")


@dataclass
class LoraSection:
    """LoRA adapters via peft; ORPO needs no reference model, so the adapted model is the only one."""

    enabled: bool = _f(False, "Train LoRA adapters instead of all weights.")
    r: int = _f(8, "Adapter rank.")
    alpha: int = _f(16, "Adapter scaling numerator (scale = alpha / r).")
    dropout: float = _f(0.0, "Dropout on the adapter input.")
    target_modules: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names to adapt (Llama-style defaults: attention and MLP projections).",
    )

    def validate(self, where: str) -> None:
        """Checked even when disabled, so switching LoRA on with an override never meets a stale bad value."""
        if self.r < 1:
            raise ConfigError(f"{where}: model.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}: model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError(f"{where}: model.lora.target_modules must be a non-empty list of module names, "
                              f"got {self.target_modules!r}")


@dataclass
class ModelSection:
    name_or_path: str = _f(
        "tiny",
        "'tiny' builds the embedded default from `tiny`; otherwise a local Hugging Face model directory "
        "(config, tokenizer, weights). Nothing is downloaded; trust_remote_code stays off.",
    )
    tokenizer: Optional[str] = _f(
        None,
        "Tokenizer directory; null means name_or_path's, or the project's byte-level tokenizer for 'tiny'.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "float32", "Dtype the weights are stored in. Compute precision is train.precision."
    )
    attn_implementation: str = _f(
        "auto", "transformers attention implementation: 'auto' picks sdpa where the model class supports it, "
        "else eager (e.g. Gemma 2, whose attention soft-capping sdpa cannot do); or name one ('sdpa', 'eager', "
        "'flex_attention', 'flash_attention_2': the packed layouts then fall back if it ignores custom masks).")
    tiny: TinyModelSection = field(default_factory=TinyModelSection, metadata={"help": "Embedded default architecture."})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA / PEFT adapters."})


# ---------------------------------------------------------------------------------------------- data
@dataclass
class SyntheticDataSection:
    """The project's own deterministic preference task, used when data.train_path is null."""

    task: str = _f("sort", "Task name in orpo_ray.data.synthetic's registry.")
    num_train: int = _f(2000, "Training pairs to generate.")
    num_eval: int = _f(200, "Held-out pairs (prompts disjoint from training).")
    seed: int = _f(0, "Generation seed.")


@dataclass
class DataSection:
    train_path: Optional[str] = _f(
        None,
        "JSONL / JSONL.gz / JSON / Parquet of preference pairs, a `datasets` save_to_disk directory (Dataset, or "
        "DatasetDict + train_split), or hf://owner/name (Hub, online only); null means the synthetic task below.",
    )
    eval_path: Optional[str] = _f(
        None, "Held-out pairs (same kinds as train_path); null: train_path's eval_split if it is a DatasetDict "
        "that has one, else eval_fraction of train_path."
    )
    format: Literal["auto", "pairs", "conversational", "hh"] = _f(
        "auto", "Row format: {prompt,chosen,rejected} strings, chat messages, or Anthropic HH transcripts; 'auto' "
        "detects each row's own format (a file may mix them), any other value forces it for every row."
    )
    max_chars: int = _f(
        1_000_000, "Rows with more characters of prompt+chosen+rejected text are quarantined before tokenization "
        "(bounds the work one row can cause; real pairs are a few thousand characters)."
    )
    on_damaged_file: Literal["error", "quarantine"] = _f(
        "error", "A truncated or mislabelled .gz/.parquet file: 'error' stops naming the file, row and byte; "
        "'quarantine' keeps the rows read before the damage and quarantines the rest as one row."
    )
    chat_template: Optional[str] = _f(
        None, "Chat template for conversational data: null uses the model directory's tokenizer's own; else a "
        "Jinja file path or a built-in name ('hh': the project's Human/Assistant format, 'chatml').")
    max_length: int = _f(512, "Longest prompt+response sequence in tokens.")
    max_prompt_length: int = _f(
        256, "Prompt budget when a pair is too long: the END of the prompt is kept (must be < max_length)."
    )
    eval_fraction: float = _f(0.05, "Share of train_path split off for eval when there is no eval data.")
    max_train_pairs: Optional[int] = _f(None, "Use only the first N training pairs (null: all).")
    max_eval_pairs: Optional[int] = _f(None, "Use only the first N eval pairs (null: all).")
    train_split: str = _f("train", "Split name for a DatasetDict directory.")
    eval_split: str = _f("test", "Eval split name for a DatasetDict directory (used when it exists).")
    drop_identical_pairs: bool = _f(False, "Drop pairs whose chosen and rejected tokenize identically.")
    cache_dir: Optional[str] = _f(None, "Where tokenized Parquet is cached; null means output_dir/cache.")
    synthetic: SyntheticDataSection = field(
        default_factory=SyntheticDataSection, metadata={"help": "Synthetic task when train_path is null."}
    )


# ---------------------------------------------------------------------------------------------- orpo
@dataclass
class OrpoSection:
    beta: float = _f(0.1, "lambda: weight of the odds-ratio term (TRL's `beta`); 0 gives plain SFT.")
    nll_on_prompt: bool = _f(
        False, "Include prompt tokens in the NLL term (TRL's behaviour); the paper's L_SFT is response-only."
    )


@dataclass
class SimpoSection:
    """SimPO (``objective: simpo``; Meng et al. 2024): -log sigmoid(beta * (mean logp_w - mean logp_l) - gamma)."""

    beta: float = _f(2.0, "Reward scale on the length-normalised log-probs (TRL's `beta`; the paper uses 2.0-2.5).")
    gamma: float = _f(1.0, "Target reward margin (TRL's `simpo_gamma`; the paper uses about 0.5-1.6).")
    alpha: float = _f(0.0, "Weight of the chosen response's NLL (TRL's `cpo_alpha`); 0 is the paper's SimPO.")


@dataclass
class CpoSection:
    """CPO (``objective: cpo``; Xu et al. 2024): -log sigmoid(beta * (sum logp_w - sum logp_l)) + alpha * NLL."""

    beta: float = _f(0.1, "Temperature on the summed log-prob difference (TRL's `beta`).")
    alpha: float = _f(1.0, "Weight of the chosen response's NLL (TRL's `cpo_alpha`).")


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainSection:
    learning_rate: float = _f(8e-6, "Peak learning rate (the paper used 5e-6 to 8e-6 on 7B models).")
    per_device_batch_size: int = _f(8, "Preference pairs per micro-batch per worker.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_steps: Optional[int] = _f(None, "Optimizer steps; null means run `epochs` epochs.")
    epochs: float = _f(1.0, "Passes over the training pairs when max_steps is null.")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    warmup_ratio: float = _f(0.0, "Warm-up as a share of total steps (used when warmup_steps is 0).")
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "Decay after warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _f(42, "Seed for data order and dropout.")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "'auto' uses bf16 autocast only where the CPU/GPU runs bf16 matmuls fast, else fp32."
    )
    log_interval: int = _f(10, "Report train metrics every N optimizer steps.")
    eval_interval: int = _f(50, "Evaluate every N optimizer steps (0: only at the end).")
    eval_max_batches: Optional[int] = _f(None, "Cap on eval micro-batches per evaluation (null: all).")
    checkpoint_interval: int = _f(0, "Checkpoint every N optimizer steps (0: only the final export).")
    progress_bar: bool = _f(True, "Show a tqdm progress bar on rank 0.")
    fail_at_step: Optional[int] = _f(
        None, "Fault injection for tests: worker rank 0 exits at this step on its first attempt."
    )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of a run: max_steps, else `epochs` passes of `steps_per_epoch` (at least 1)."""
        return self.max_steps or max(1, math.ceil(steps_per_epoch * self.epochs))


# ---------------------------------------------------------------------------------------- efficiency
@dataclass
class EfficiencySection:
    """Speed/memory switches, on by default; each gives the same losses and gradients as the plain path
    (tests/unit). A switch the model cannot take (checked at load, see forward/fast_path.py) falls back for
    the run with one printed line, recorded in results.json `fast_path` and the MLflow params."""

    chunked_lm_head: bool = _f(
        True, "Apply the lm-head chunk by chunk to the positions that have targets only; never hold [2B, T, V]."
    )
    lm_head_chunk_size: int = _f(1024, "Positions per lm-head chunk (the fp32 temporary is chunk x vocab).")
    fused_loss: bool = _f(
        True, "With chunked_lm_head (lm_head: chunked): the lm-head computes the loss and its gradient in its forward, "
        "group of whole pairs by group (forward/fused_loss.py), so backward does not compute the logits again.")
    prefix_sharing: bool = _f(
        True, "Encode each prompt once: one sequence [prompt | chosen | rejected] with a block attention mask."
    )
    packing: bool = _f(True, "Pack several pairs into one row (block-diagonal mask) so padding is not computed.")
    segment_attention: Union[bool, Literal["auto"]] = _f(
        "auto", "With prefix_sharing or packing: attention runs segment by segment (the model's own sdpa/eager on each "
        "segment's slice, forward/segment_attention.py) instead of under one dense [L, L] block mask per row, so "
        "row length costs nothing and a packed batch is one row without padding. Needs sdpa or eager attention. "
        "'auto': on for CPU workers, off for GPU workers, where one kernel launch per segment and layer costs far "
        "more than the dense mask's flops (H200, 99M Llama, batch 32: 65-70 pairs/s with it, 420 without).")
    pack_length: Optional[int] = _f(
        None, "Tokens per packed row; null means the whole batch in one row with segment_attention, else the longest "
        "segment of each batch (a dense mask costs L^2 per row).")
    fused_layers: bool = _f(
        True, "RMSNorms run as one autograd function (forward/fused_layers.py) that keeps the input and the inverse "
        "RMS for backward, not the normalised input as well: less activation memory, the same numbers, a little "
        "faster. Each module class is checked against its own forward at load; a class that differs keeps it. "
        "Falls back under ZeRO-3, and on a model without an RMSNorm it reproduces.")
    mlp_recompute: bool = _f(
        True, "With fused_layers: gated MLPs (gate_proj/up_proj/down_proj) too, keeping gate and up and recomputing "
        "act(gate) and act(gate) * up in backward, in place: 2 x intermediate_size fewer floats per token and layer "
        "at autograd's speed (8k bench, fp32: peak RSS 734-742 -> 700-705 MB in-process, pairs/s within the noise). "
        "false: only the norms are fused.")
    lm_head: Literal["chunked", "liger"] = _f(
        "chunked", "Kernel of the chunked lm-head: 'chunked' (the project's, any device) or 'liger' (Liger-Kernel's "
        "fused linear cross-entropy, per-token; needs chunked_lm_head, scaling.use_gpu, CUDA and liger-kernel>=0.8.2 "
        "on the workers: an error at load otherwise, never a silent swap).")


@dataclass
class BenchSection:
    """`orpo-ray bench`: TRL's ORPOTrainer against orpo-ray on the same model, data, batch and steps."""

    vocab_size: int = _f(8192, "BPE vocabulary trained on the HH text for the benchmark model.")
    num_pairs: Optional[int] = _f(None, "Training pairs to use; null means max_steps x per_device_batch_size.")
    matmul_size: int = _f(1024, "Side of the square matmul that measures the machine's fp32/bf16 peak.")
    repeats: int = _f(1, "Rounds: every leg runs once per round, round after round, so a slow spell of a shared "
                      "machine falls on all legs alike; each leg's fastest run and worst peak RSS are reported "
                      "(all runs kept).")
    legs: list = _f([], "Contenders: {name, kind: trl|orpo, precision, overrides: [key=value ...], ray: bool} "
                    "mappings (ray: true trains through Ray Train as `orpo-ray train` does; else in-process).")
    pairs: Literal["clean", "consecutive"] = _f(
        "clean", "'clean': only pairs neither side truncates and whose tokens are the same tokenized jointly (the "
        "loss comparison); 'consecutive': the first pairs as they come, long ones truncated by each side.")
    families: list[str] = _f(
        [], "Non-empty: instead of the legs, train each named tiny family (orpo_ray/commands/families.py) with the "
        "defaults and with the plain path on data.train_path's first pairs; prints a pairs/s and peak RSS table.")


# ------------------------------------------------------------------------------------------- scaling
@dataclass
class ScalingSection:
    num_workers: int = _f(1, "Ray Train workers (data-parallel ranks).")
    use_gpu: bool = _f(False, "One GPU per worker, NCCL backend.")
    cpus_per_worker: Union[int, Literal["auto"]] = _f(
        "auto", "CPUs reserved per worker, and its torch threads. 'auto': when Ray runs on this one machine, its "
        "cores split evenly across the workers (a sweep with max_concurrent_trials > 1 should name a number); "
        "on a multi-node cluster 1.")
    address: Optional[str] = _f(None, "Ray cluster address; null starts a local Ray instance.")
    local_dashboard: bool = _f(
        False, "Whether the local Ray instance `orpo-ray train` starts (no address) runs Ray's dashboard. Off: its "
        "dozen processes wake the CPUs ~500 times a second, each wake preempting a training thread (measured on 2 "
        "cores: 9.0 pairs/s with it, 12.4 without, in-process 12.4); without it Ray's State API is unavailable. "
        "`orpo-ray tune` always starts it: Ray Train's placement-group cleaner needs the State API to free the "
        "resources of trials a scheduler stopped.")
    allocator: Literal["auto", "jemalloc", "system"] = _f(
        "auto", "malloc of the Ray workers (orpo_ray/allocator.py). 'jemalloc': Ray's bundled libjemalloc.so, preloaded "
        "into the workers through the job's runtime env; glibc's heap fragments under a step's changing tensor sizes "
        "(8k bench leg: 819 MB peak RSS under jemalloc, 945 under glibc, same speed); its MALLOC_CONF keeps freed pages "
        "for reuse (allocator.JEMALLOC_CONF) unless MALLOC_CONF is exported. 'system': the process's own "
        "malloc. 'auto': jemalloc on the local instance a run starts, the system's on a cluster (the library's path "
        "is this machine's) or when LD_PRELOAD is exported. `train --local` restarts itself under the same preload.")
    omp_spin_count: Union[int, Literal["auto"]] = _f(
        "auto", "How long a training process's OpenMP threads spin at a barrier before they sleep (GOMP_SPINCOUNT, "
        "set in the environment the Ray workers and `train --local` start with; orpo_ray/omp_wait.py). 'auto': "
        "10000 unless GOMP_SPINCOUNT or OMP_WAIT_POLICY is exported (then theirs): libgomp's own 300000 lets a "
        "thread spin for as long as Ray's processes keep its partner off a core (8k bench through Ray, 2 cores: "
        "~20.4 pairs/s with it, ~23 with 10000; in-process unchanged). An int: that count (0: sleep at once).")
    max_failures: int = _f(1, "Worker-group restarts Ray Train may do (resuming from the last checkpoint).")
    memory_per_worker_gb: Optional[float] = _f(
        None, "Memory one worker may use, for `orpo-ray plan`'s warning: null means the GPU's memory (use_gpu, when a "
        "GPU is visible here) or this machine's RAM / num_workers.")
    storage_path: Optional[str] = _f(
        None, "Shared storage for Ray Train checkpoints: a local/mounted directory (made absolute) or a URI Ray Train "
        "supports (s3://, gs://, file://, any pyarrow filesystem; passed as is); null means output_dir/ray.")

    def cluster_address(self) -> str | None:
        """The cluster a run joins: `address`, else the RAY_ADDRESS `ray job submit` sets; None means the run
        starts its own local instance - the one rule the launcher, the plan and the allocator share."""
        return self.address or os.environ.get("RAY_ADDRESS")

    def resolved_cpus(self, one_node_cpus: int | None) -> int:
        """cpus_per_worker with 'auto' resolved - the one rule the launcher, the plan and validation share:
        `one_node_cpus` is the CPU count of a one-node Ray instance (split evenly across the workers), None
        on a multi-node cluster or when it is not known yet (1 per worker)."""
        if self.cpus_per_worker != "auto":
            return self.cpus_per_worker
        return 1 if one_node_cpus is None else max(1, one_node_cpus // self.num_workers)


@dataclass
class DeepSpeedSection:
    enabled: Union[bool, Literal["auto"]] = _f(
        "auto", "Use DeepSpeed under Ray Train; false: torch AdamW, gradients averaged across workers. 'auto': DeepSpeed "
        "when there is something to shard or offload (num_workers > 1, or an offload option), else torch AdamW - "
        "ZeRO with one worker only copies gradients into its flat buffers, and importing deepspeed costs a worker "
        "~125 MB.")
    zero_stage: int = _f(2, "ZeRO stage 0/1/2/3.")
    offload_optimizer: bool = _f(False, "ZeRO-Offload of optimizer state to CPU memory.")
    offload_param: bool = _f(False, "Offload parameters to CPU (ZeRO-3 only).")
    overlap_comm: bool = _f(False, "Overlap gradient reduction with backward (GPU only).")
    reduce_bucket_size: int = _f(50_000_000, "Elements per gradient-reduction bucket.")

    def resolved(self, num_workers: int) -> bool:
        """enabled with 'auto' resolved: the one rule the training loop and the plan share."""
        if self.enabled != "auto":
            return self.enabled
        return num_workers > 1 or self.offload_optimizer or self.offload_param


# ------------------------------------------------------------------------------------------ tracking
@dataclass
class TrackingSection:
    enabled: bool = _f(True, "Track the run in MLflow.")
    mlflow_uri: Optional[str] = _f(
        None, "MLflow tracking URI; null means sqlite:///<abs output_dir>/mlflow.db (no server needed)."
    )
    experiment: str = _f("orpo-ray", "MLflow experiment name.")
    run_name: Optional[str] = _f(
        None, "MLflow run name; null says what the run is: output_dir's name (the config's, by convention), λ and lr."
    )
    backend: str = _f("mlflow", "Tracking backend: a name in orpo_ray.tracking.BACKENDS (mlflow).")
    system_metrics: bool = _f(True, "Log CPU, memory (GPU where present) of rank 0's node as system/ metrics.")
    system_metrics_interval_s: float = _f(10.0, "Seconds between system-metric samples.")
    log_model: bool = _f(
        True, "Log the exported model as an MLflow model (transformers flavour; LoRA: the adapter directory)."
    )
    registered_model_name: Optional[str] = _f(
        "orpo-ray-best", "`orpo-ray tune`: register the best trial's model under this name (null: no registration)."
    )


# ---------------------------------------------------------------------------------------------- tune
@dataclass
class TuneSection:
    """`orpo-ray tune CONFIG`: a Ray Tune sweep of β (λ) [x γ] x learning rate; every trial a full Ray Train run."""

    beta: list[float] = _f([0.05, 0.1, 0.2], "Values of the objective's beta to grid-search (orpo.beta = λ, "
                           "simpo.beta, cpo.beta); ORPO's 0 is the SFT baseline.")
    gamma: list[float] = _f([], "SimPO only: simpo.gamma values to grid-search; empty keeps simpo.gamma.")
    learning_rate: list[float] = _f([], "Learning rates to grid-search; empty: sample log-uniform from the range below.")
    learning_rate_min: float = _f(1e-4, "Lower bound of the log-uniform learning-rate range (learning_rate: []).")
    learning_rate_max: float = _f(1e-3, "Upper bound of the log-uniform learning-rate range (learning_rate: []).")
    num_samples: int = _f(1, "Tune's num_samples: repeats of the grid (with a sampled learning rate, one new draw each).")
    metric: str = _f("eval_rewards/accuracies", "Held-out metric that ranks trials (an eval_ metric, e.g. eval_loss).")
    mode: Literal["max", "min"] = _f("max", "Whether the metric is maximised or minimised.")
    max_concurrent_trials: int = _f(1, "Trials running at once; each needs scaling.num_workers x cpus_per_worker CPUs.")
    asha: bool = _f(True, "Stop weak trials early with the ASHA scheduler (one result per evaluation).")
    asha_grace_period: int = _f(1, "Evaluations every trial gets before ASHA may stop it.")
    asha_reduction_factor: int = _f(2, "ASHA keeps the top 1/reduction_factor of trials at each rung.")


@dataclass
class EvalSection:
    """`orpo-ray eval CONFIG eval.checkpoint=PATH`: held-out preference metrics of a trained model."""

    checkpoint: Optional[str] = _f(
        None, "Model directory to evaluate, or a run's output_dir (its model/ is used); required by `eval`."
    )
    num_generations: int = _f(4, "Greedy generations for the first N eval prompts (0: none).")
    max_new_tokens: int = _f(32, "Token budget of each greedy generation.")


@dataclass
class ExportSection:
    save_model: bool = _f(True, "save_pretrained the final model and tokenizer to output_dir/model.")
    merge_lora: bool = _f(False, "With LoRA: also export a merged full model to output_dir/merged.")


@dataclass
class Config:
    output_dir: str = _f("outputs/run", "Where results.json, the model and tracking files go; one run at a time (a lock "
                         "file refuses a second writer). A local path (made absolute), or a URI (s3://, gs://, file://, "
                         "any pyarrow filesystem): then the command writes to a local staging dir, "
                         "$ORPO_RAY_STAGING_DIR or ~/.cache/orpo-ray/staging/<hash>/<name>, which also holds the "
                         "cache, MLflow db and checkpoint defaults, and uploads its outputs there when it ends; the "
                         "lock then covers this host only.")
    # The choices are orpo_ray.objectives.OBJECTIVES (a unit test keeps them equal); each has its section below.
    objective: Literal["orpo", "simpo", "cpo"] = _f(
        "orpo", "Preference objective: orpo, simpo or cpo; only the section of that name is read (so "
        "orpo.nll_on_prompt is ORPO's: SimPO and CPO take TRL's response-only NLL)."
    )
    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "Model and tokenizer."})
    data: DataSection = field(default_factory=DataSection, metadata={"help": "Preference data."})
    orpo: OrpoSection = field(default_factory=OrpoSection, metadata={"help": "ORPO objective."})
    simpo: SimpoSection = field(default_factory=SimpoSection, metadata={"help": "SimPO objective."})
    cpo: CpoSection = field(default_factory=CpoSection, metadata={"help": "CPO objective."})
    train: TrainSection = field(default_factory=TrainSection, metadata={"help": "Optimisation."})
    scaling: ScalingSection = field(default_factory=ScalingSection, metadata={"help": "Ray Train workers."})
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection, metadata={"help": "DeepSpeed."})
    efficiency: EfficiencySection = field(default_factory=EfficiencySection, metadata={"help": "Speed-ups."})
    bench: BenchSection = field(default_factory=BenchSection, metadata={"help": "Benchmark vs TRL."})
    tracking: TrackingSection = field(default_factory=TrackingSection, metadata={"help": "MLflow."})
    tune: TuneSection = field(default_factory=TuneSection, metadata={"help": "Ray Tune sweep."})
    export: ExportSection = field(default_factory=ExportSection, metadata={"help": "Model export."})
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "`orpo-ray eval`."})

    def validate(self, where: str = "config") -> "Config":
        """Cross-field checks the type system cannot express."""
        d, t = self.data, self.train
        if d.max_chars < 1:
            raise ConfigError(f"{where}: data.max_chars must be >= 1, got {d.max_chars}")
        if not 0 < d.max_prompt_length < d.max_length:
            raise ConfigError(
                f"{where}: data.max_prompt_length ({d.max_prompt_length}) must be > 0 and < data.max_length "
                f"({d.max_length}) so every pair keeps at least one response token"
            )
        for key, value in (("train.per_device_batch_size", t.per_device_batch_size),
                           ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                           ("train.log_interval", t.log_interval), ("scaling.num_workers", self.scaling.num_workers),
                           ("scaling.cpus_per_worker", self.scaling.resolved_cpus(None))):
            if value < 1:
                raise ConfigError(f"{where}: {key} must be >= 1, got {value}")
        if self.scaling.omp_spin_count != "auto" and self.scaling.omp_spin_count < 0:
            raise ConfigError(f"{where}: scaling.omp_spin_count must be 'auto' or >= 0, got {self.scaling.omp_spin_count}")
        if self.tracking.system_metrics_interval_s <= 0:
            raise ConfigError(f"{where}: tracking.system_metrics_interval_s must be > 0, got "
                              f"{self.tracking.system_metrics_interval_s}")
        if t.max_steps is not None and t.max_steps < 1:
            raise ConfigError(f"{where}: train.max_steps must be >= 1 or null, got {t.max_steps}")
        self.model.lora.validate(where)
        if self.export.merge_lora and not self.model.lora.enabled:
            raise ConfigError(f"{where}: export.merge_lora=true needs model.lora.enabled=true (there is no "
                              "adapter to merge otherwise)")
        self._validate_objective(where)
        e = self.efficiency
        if e.lm_head_chunk_size < 1 or (e.pack_length is not None and e.pack_length < 2 * d.max_length):
            raise ConfigError(f"{where}: efficiency.lm_head_chunk_size must be >= 1 and efficiency.pack_length "
                              f">= 2 * data.max_length ({2 * d.max_length}) so any pair fits one row")
        if e.lm_head == "liger" and not (e.chunked_lm_head and self.scaling.use_gpu):
            raise ConfigError(f"{where}: efficiency.lm_head=liger needs efficiency.chunked_lm_head=true and "
                              "scaling.use_gpu=true (Liger's fused lm-head is a CUDA kernel for the chunked lm-head)")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}: deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.deepspeed.zero_stage}")
        self._validate_tune(where)
        return self

    def _validate_objective(self, where: str) -> None:
        for key, value in (("orpo.beta", self.orpo.beta), ("simpo.beta", self.simpo.beta),
                           ("simpo.alpha", self.simpo.alpha), ("cpo.beta", self.cpo.beta), ("cpo.alpha", self.cpo.alpha)):
            if value < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")

    def _validate_tune(self, where: str) -> None:
        u = self.tune
        if not u.beta or any(b < 0 for b in u.beta):
            raise ConfigError(f"{where}: tune.beta must be a non-empty list of numbers >= 0, got {u.beta}")
        if u.gamma and self.objective != "simpo":
            raise ConfigError(f"{where}: tune.gamma sweeps simpo.gamma and needs objective simpo "
                              f"(objective is {self.objective!r})")
        if any(lr <= 0 for lr in u.learning_rate):
            raise ConfigError(f"{where}: tune.learning_rate must list numbers > 0, got {u.learning_rate}")
        if not 0 < u.learning_rate_min < u.learning_rate_max:
            raise ConfigError(f"{where}: tune.learning_rate_min ({u.learning_rate_min}) must be > 0 and < "
                              f"tune.learning_rate_max ({u.learning_rate_max})")
        minimum = {"num_samples": 1, "max_concurrent_trials": 1, "asha_grace_period": 1, "asha_reduction_factor": 2}
        for key, least in minimum.items():
            if getattr(u, key) < least:
                raise ConfigError(f"{where}: tune.{key} must be >= {least}, got {getattr(u, key)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- loader
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently coerce) `value` against the annotation `tp`; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {key} has an invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping (section), got {type(value).__name__}")
        return _build(tp, value, where, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; people mean a float
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            item_type = (typing.get_args(tp) or (None,))[0]
            return [v if item_type is None else _coerce(v, item_type, f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - every annotation used above is handled
        raise ConfigError(f"{where}: {key} has an unsupported annotation {tp!r}")
    raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"'{prefix}{k}'" for k in unknown)
            + f" (known in this section: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(v, hints[name], f"{prefix}{name}", where) for name, v in values.items()}
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value), so ``1e-5``, ``true``, ``null``, ``[1,2]`` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-5" as a string; people mean a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML config, apply dotted overrides, type-check, and validate.

    Raises ConfigError naming the file and key on unknown keys, wrong types or invalid combinations.
    """
    tree: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        try:
            set_dotted(tree, key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if overrides:
        where = f"{where} (with overrides {' '.join(overrides)})"
    return _build(Config, tree, where).validate(where)


def config_from_dict(values: dict, where: str = "config dict") -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. inside a Ray worker)."""
    return _build(Config, values, where).validate(where)


# The training loop's config is a plain dict (Ray Train pickles it to every worker): `Config.to_dict()` plus this key
# for what is not configuration (e.g. the MLflow parent run of a sweep, the data statistics of the driver).
RUN_EXTRAS_KEY = "_run"


def loop_config(cfg: Config, extras: dict) -> dict:
    """The dict `train_loop_per_worker` takes: `cfg` plus the run's extras."""
    return {**cfg.to_dict(), RUN_EXTRAS_KEY: extras}


def split_loop_config(config: dict) -> tuple[Config, dict]:
    """Inverse of `loop_config`: (Config, extras)."""
    config = dict(config)
    extras = config.pop(RUN_EXTRAS_KEY, None) or {}
    return config_from_dict(config, where="train_loop_per_worker config"), extras


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: the source of `orpo-ray config --help`-style docs."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows


def is_uri(path: str) -> bool:
    """s3://..., gs://..., file://..., hf://...: a location some filesystem layer resolves, not a local path."""
    return "://" in path


def template_path(setting: str | None) -> str | None:
    """data.chat_template made absolute when it names a file here (built-in names and null stay as they are):
    the Ray workers, which apply it to the tokenizer they export, run in another directory."""
    if setting is None or is_uri(setting) or not Path(setting).expanduser().is_file():
        return setting
    return str(Path(setting).expanduser().resolve())


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose local paths are absolute: Ray workers and Ray Data tasks run in other directories.

    Leaves 'tiny', URIs (``scheme://``), null and built-in chat template names alone.
    """
    def absolute(path: str | None) -> str | None:
        if path is None or path == "tiny" or is_uri(path):
            return path
        return str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        output_dir=absolute(cfg.output_dir),
        model=dataclasses.replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path),
                                  tokenizer=absolute(cfg.model.tokenizer)),
        data=dataclasses.replace(cfg.data, train_path=absolute(cfg.data.train_path),
                                 eval_path=absolute(cfg.data.eval_path), cache_dir=absolute(cfg.data.cache_dir),
                                 chat_template=template_path(cfg.data.chat_template)),
        scaling=dataclasses.replace(cfg.scaling, storage_path=absolute(cfg.scaling.storage_path)),
    )
