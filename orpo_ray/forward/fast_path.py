"""Which ``efficiency`` switches this model can take, checked once at load; the others fall back, loudly.

The switches default to on, so they meet every causal LM a user brings. Each is only a different way to get
the plain path's numbers (``model(...).logits``), so before a run uses one it is checked on this model:

- ``chunked_lm_head`` runs the model's body (``base_model``) and applies its head (`chunked_lm_head.LmHead`:
  weight, bias, logit scaling, soft-cap read from the config) itself. Check: the head's logits on a few
  tokens equal ``model(...).logits``. Not separable or not equal -> fallback. The layouts below need the
  body/head split too, so they fall back with it.
- ``prefix_sharing`` / ``packing`` feed the body a custom 4-D block mask and restarted position ids. Static
  reasons first (an attention implementation that does not take a custom 4-D mask as-is, a sliding window
  shorter than ``data.max_length``: transformers does not apply the window to a mask it is given, while the
  plain path would), then a probe: two short pairs through the packed layout and the padded plain path, whose
  target log-probs must agree. Absolute position embeddings (GPT-2, OPT) pass: the packed layout gives every
  token the position it has in the padded layout.
- ``fused_layers`` replaces the forward of RMSNorms and gated MLPs (those with ``mlp_recompute``, the default) with autograd
  functions that keep fewer activations (`fused_layers`). Check: each module class's output and gradients equal its own forward on a random
  input; a class that differs keeps its own forward (one line says so). No class fused, or ZeRO-3 -> fallback.
- ``segment_attention`` (only meaningful with a packed layout) runs the packed rows' attention segment by
  segment through the model's own attention function, which must take the ``orpo_segments`` keyword from the
  body's forward. The same probe with it on; if that fails but the dense block mask passes, only this switch
  falls back.

A fallback is one printed line per switch (`FastPath.lines`) and is recorded in results.json / MLflow params
(`FastPath.record`). Tolerances: fp32 weights 1e-5 relative (the parity the unit tests hold the paths to);
half-precision weights 2e-2. Pure module: torch only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from orpo_ray.config import Config
from orpo_ray.forward.chunked_lm_head import causal_lm_parts, unwrap_causal_lm
from orpo_ray.forward.collate import collate_pairs
from orpo_ray.forward.fused_layers import fuse_layers, plan_fused_layers
from orpo_ray.forward.liger_lm_head import require_liger
from orpo_ray.forward.logprobs import full_logits_token_stats
from orpo_ray.forward.packing import collate_packed, packed_token_stats

SWITCHES = ("chunked_lm_head", "prefix_sharing", "packing", "segment_attention", "fused_layers")
LAYOUTS = ("prefix_sharing", "packing")
MASK_ATTENTION = ("sdpa", "eager")  # take a 4-D mask as-is (see packing.mask_for_attention)


@dataclass
class FastPath:
    """The switches a run actually uses, and why any asked-for switch is off."""

    requested: dict[str, bool]
    fallbacks: dict[str, str] = field(default_factory=dict)  # switch -> reason
    auto: dict[str, str] = field(default_factory=dict)  # switch set to 'auto' and off on this device -> why
    layers: dict[str, str] = field(default_factory=dict)  # fused_layers: module class -> 'fused' or why not

    def fuse(self, model: torch.nn.Module) -> dict[str, int]:
        """Apply ``fused_layers`` to `model` where this run uses it: {module class: instances fused}."""
        if not self.requested.get("fused_layers") or "fused_layers" in self.fallbacks:
            return {}
        return dict(fuse_layers(model, self.layers))

    def apply(self, cfg: Config) -> Config:
        """`cfg` with the fallen-back switches off and segment_attention's 'auto' decided (all else unchanged)."""
        segments = self.requested["segment_attention"] and "segment_attention" not in self.fallbacks
        return dataclasses.replace(cfg, efficiency=dataclasses.replace(
            cfg.efficiency, **{k: False for k in self.fallbacks} | {"segment_attention": segments}))

    def lines(self) -> list[str]:
        instead = {"segment_attention": "the dense block mask", "fused_layers": "the model's own layers"}
        lines = [f"[orpo-ray] efficiency.{k} falls back to {instead.get(k, 'the plain path')} for this run: {why}"
                 for k, why in self.fallbacks.items()]
        if "fused_layers" not in self.fallbacks:
            lines += [f"[orpo-ray] efficiency.fused_layers: {name} keeps its own forward: {why}"
                      for name, why in self.layers.items() if why != "fused"]
        return lines

    def record(self) -> dict[str, str]:
        """{switch: 'on' | 'off' | 'off: why auto chose it' | 'fallback: reason'} for results.json and MLflow."""
        return {k: f"fallback: {self.fallbacks[k]}" if k in self.fallbacks
                else f"off: {self.auto[k]}" if k in self.auto else ("on" if on else "off")
                for k, on in self.requested.items()}


def resolve_fast_path(model: torch.nn.Module, cfg: Config) -> FastPath:
    """Check every requested switch against `model` (a few tiny no-grad forwards; RNG untouched)."""
    e = cfg.efficiency
    device = next(model.parameters()).device  # the worker's: the model is on it by now
    auto_off = segment_attention_auto_off(e.segment_attention, device)
    requested = {k: bool(getattr(e, k)) for k in SWITCHES} | {
        "segment_attention": segment_attention_on(e.segment_attention, device)}
    # Segment attention is a way to run the packed layouts: without one it has nothing to do (not a fallback).
    requested["segment_attention"] &= any(requested[k] for k in LAYOUTS)
    fast = FastPath(requested, auto={"segment_attention": auto_off} if auto_off else {})
    wanted = [k for k, on in fast.requested.items() if on]
    if not wanted:
        return fast
    inner = unwrap_causal_lm(model)
    was_training = inner.training
    inner.eval()  # dropout off: the probe compares two deterministic forwards
    try:
        with torch.no_grad():
            head_reason = _head_reason(inner)
            reasons = {"chunked_lm_head": head_reason}
            if any(k in wanted for k in LAYOUTS):
                if head_reason:
                    layout = segments = f"it needs the model's body and head separately, and {head_reason}"
                else:
                    segments = _layout_reason(inner, cfg, segments=True) if "segment_attention" in wanted else None
                    # The dense block mask runs only where segment attention does not: off, or fallen back.
                    dense = segments or "segment_attention" not in wanted
                    layout = _layout_reason(inner, cfg, segments=False) if dense else None
                # No packed layout: segment attention has nothing to run on.
                reasons.update(dict.fromkeys(LAYOUTS, layout), segment_attention=layout or segments)
    finally:
        inner.train(was_training)
    if "fused_layers" in wanted:
        reasons["fused_layers"] = _layers_reason(inner, cfg, fast)
    for k in wanted:
        if reasons.get(k):
            fast.fallbacks[k] = reasons[k]
    if e.lm_head == "liger" and "chunked_lm_head" in wanted and not reasons.get("chunked_lm_head"):
        require_liger(causal_lm_parts(inner)[1])  # asked for by name: an error here, never a silent swap
    return fast


def segment_attention_on(setting, device: torch.device) -> bool:
    """`efficiency.segment_attention` (true, false or 'auto') for a worker on `device`."""
    return setting is True or (setting == "auto" and segment_attention_auto_off(setting, device) is None)


def segment_attention_auto_off(setting, device: torch.device) -> str | None:
    """Why `efficiency.segment_attention: auto` is off on `device` (None: on, or not 'auto'). Per-segment attention
    launches one attention kernel per segment and layer: on a CPU that costs nothing next to the flops it saves,
    on a GPU the launches dominate (scripts/gpu_check.sh --ablation on an H200: 65-70 pairs/s with it, 420 without)."""
    if setting != "auto" or device.type == "cpu":
        return None
    return f"auto on {device.type} (one attention kernel per segment costs more there than the dense block mask)"


def _layers_reason(model: torch.nn.Module, cfg: Config, fast: FastPath) -> str | None:
    """None when some MLP / RMSNorm class of `model` runs fused (`fast.layers` says which); else why not."""
    if cfg.deepspeed.resolved(cfg.scaling.num_workers) and cfg.deepspeed.zero_stage == 3:
        return "ZeRO-3 gathers each Linear's parameters in that Linear's own forward hook, which a fused block skips"
    mlp = cfg.efficiency.mlp_recompute
    fast.layers = plan_fused_layers(model, _relative_error, _tolerance(model), mlp=mlp)
    if "fused" in fast.layers.values():
        return None
    kept = "; ".join(f"{name}: {why}" for name, why in fast.layers.items())
    what = "gated MLP or RMSNorm" if mlp else "RMSNorm"
    return f"no {what} module whose forward it reproduces" + (f" ({kept})" if kept else "")


def _tolerance(model: torch.nn.Module) -> float:
    return 1e-5 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 2e-2


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1.0))


def _probe_ids(vocab: int, n: int, salt: int = 0) -> list[int]:
    """Fixed token ids spread over the vocabulary (no RNG, so the training seed's stream is not shifted)."""
    return [(salt * 101 + i * 7919 + 3) % vocab for i in range(n)]


def _head_reason(model: torch.nn.Module) -> str | None:
    """None when body + `LmHead` reproduce ``model(...).logits``; else why the chunked lm-head cannot be used."""
    try:
        body, head = causal_lm_parts(model)
    except TypeError as exc:
        return str(exc)
    ids = torch.tensor([_probe_ids(head.weight.shape[0], 8)], device=head.weight.device)
    try:
        ref = model(input_ids=ids, use_cache=False).logits
        ours = head.logits(body(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception as exc:  # noqa: BLE001 - any failure of the split means: use the plain path
        return f"running its body and head separately failed ({type(exc).__name__}: {exc})"
    err = _relative_error(ours, ref)
    if err > _tolerance(model):
        return (f"the head derived from its config (bias, logit scaling, soft-cap) does not reproduce the "
                f"model's own logits (relative error {err:.1e})")
    return None


def sliding_window(config) -> int | None:
    """The attention window some layer of this model applies, or None (no layer slides)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _layout_reason(model: torch.nn.Module, cfg: Config, segments: bool) -> str | None:
    """None when the packed / prefix-shared layout (attention per segment or under the dense block mask) gives
    the padded plain path's log-probs; else why not."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASK_ATTENTION:
        return f"attn_implementation={impl!r} does not take a custom 4-D attention mask as-is"
    window = sliding_window(model.config)
    if window is not None and window < cfg.data.max_length:
        return (f"its sliding window ({window} tokens) is shorter than data.max_length ({cfg.data.max_length}); "
                "the block mask would let tokens see past it")
    e = cfg.efficiency
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = [{"prompt_ids": _probe_ids(vocab, p, salt), "chosen_ids": _probe_ids(vocab, c, salt + 1),
             "rejected_ids": _probe_ids(vocab, r, salt + 2)} for salt, (p, c, r) in enumerate([(4, 3, 2), (2, 2, 4)])]
    padded = collate_pairs(rows, pad_token_id=0)
    packed = collate_packed(rows, pad_token_id=0, prefix_sharing=e.prefix_sharing,
                            pack_length=("all" if segments else "longest") if e.packing else None)
    device = model.get_output_embeddings().weight.device
    to = lambda b: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    try:
        ref = full_logits_token_stats(model, to(padded)).logps.flatten()
        ours = packed_token_stats(model, to(packed), nll_on_prompt=True, chunk=None, segments=segments).logps.flatten()
    except Exception as exc:  # noqa: BLE001
        how = "attention per segment" if segments else "the packed layout"
        return f"its body does not run {how} ({type(exc).__name__}: {exc})"
    dst = packed["target_dst"].to(device)
    err = _relative_error(ours[dst], ref[dst])
    if err > _tolerance(model):
        how = "attention per segment" if segments else "the block mask"
        return (f"with {how} and restarted position ids its log-probs differ from the padded layout's "
                f"(relative error {err:.1e})")
    return None
