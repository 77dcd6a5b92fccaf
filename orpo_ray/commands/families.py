"""Tiny random-init causal LMs of the families users bring: the family matrix of the tests and of
`orpo-ray bench configs/bench/families.yaml`.

Each is 2 layers, hidden 32-64, with an embedding table of 264 rows: the project's byte-level tokenizer's 259
tokens, padded to a multiple of 8 as real checkpoints do (and room for the unk token transformers' Qwen / GPT-2
tokenizer classes add when they load a plain tokenizer from such a directory); no dropout (so the default and plain paths can be compared exactly). `FAMILIES` maps a name to a transformers
config; `build_model` instantiates one in memory, `save_family` writes it with a tokenizer variant as a local
model directory (what `model.name_or_path` reads).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from orpo_ray.embedded_tokenizer import build_byte_tokenizer

VOCAB = 264  # the byte-level tokenizer's 259 tokens, padded
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=4096),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: tf.Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    # Gemma 2: final logit soft-capping and attention soft-capping (eager only), tied embeddings.
    "gemma2": lambda: tf.Gemma2Config(**_LLAMA_LIKE, head_dim=8, final_logit_softcapping=3.0,
                                      attn_logit_softcapping=5.0, sliding_window=4096),
    "gemma3": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=8, final_logit_softcapping=3.0,
                                          sliding_window=4096),
    # Phi-2: lm_head with a bias, partial rotary, parallel attention/MLP.
    "phi2": lambda: tf.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attention_dropout=0.0),
    "phi3": lambda: tf.Phi3Config(**_LLAMA_LIKE),
    "olmo2": lambda: tf.Olmo2Config(**_LLAMA_LIKE),
    # OPT and GPT-2: learned absolute position embeddings; tied heads.
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512,
                                dropout=0.0, attention_dropout=0.0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                         attention_dropout=0.0, hidden_dropout=0.0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # Logit multiplier (Cohere) and divisor (Granite) in the head.
    "cohere": lambda: tf.CohereConfig(**_LLAMA_LIKE, logit_scale=0.5),
    "granite": lambda: tf.GraniteConfig(**_LLAMA_LIKE, logits_scaling=4.0),
    # MoE. output_router_logits: the model computes its router aux loss; orpo-ray does not add it (README).
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, output_router_logits=True,
                                           router_aux_loss_coef=0.5),
}


def build_model(family: str, seed: int = 0, attn_implementation: str | None = None) -> torch.nn.Module:
    """The family's tiny model in fp32, with the attention implementation `model.attn_implementation: auto` picks."""
    config = FAMILIES[family]()
    # The byte tokenizer's specials (<s> 256, </s> 257, <pad> 258), not each family's real ids.
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 256, 257, 258
    model_class = tf.AutoModelForCausalLM._model_mapping[type(config)]
    config._attn_implementation = attn_implementation or ("sdpa" if model_class._supports_sdpa else "eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.float()


def byte_tokenizer(variant: str = "bos"):
    """The byte-level tokenizer: 'bos' (BOS, EOS, PAD), 'no_bos' (EOS, PAD; Qwen-like), 'eos_only'."""
    tok = build_byte_tokenizer()
    if variant in ("no_bos", "eos_only"):
        tok.bos_token = None
    if variant == "eos_only":
        tok.pad_token = None
    return tok


def save_family(family: str, out: Path, tokenizer_variant: str = "bos") -> Path:
    """`family`'s tiny model + a tokenizer variant saved as a local model directory."""
    build_model(family).save_pretrained(out)
    byte_tokenizer(tokenizer_variant).save_pretrained(out)
    return out


# ------------------------------------------------------------------------- `orpo-ray bench` bench.families
PLAIN = ["efficiency.chunked_lm_head=false", "efficiency.prefix_sharing=false", "efficiency.packing=false",
         "efficiency.fused_layers=false"]


def run_family_bench(cfg, work: Path) -> dict:
    """Each family of ``bench.families`` with the defaults and with the plain path, on data.train_path's first
    pairs (HH transcripts; the byte-level tokenizer, so max_length counts bytes): pairs/s and peak RSS per leg,
    each leg in its own subprocess (`bench.run_rounds`). Writes output_dir/families.json, prints a Markdown table."""
    import json
    import os

    from orpo_ray.commands.bench import run_rounds
    from orpo_ray.data.records import read_pairs
    from orpo_ray.precision import hardware_summary

    unknown = [f for f in cfg.bench.families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"bench.families: unknown {unknown} (known: {', '.join(FAMILIES)})")
    pairs, _ = read_pairs(cfg.data.train_path, "hh")
    wanted = cfg.train.max_steps * cfg.train.per_device_batch_size
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs[:wanted + 8]]
    paths = {"train": work / "families_train.jsonl", "eval": work / "families_eval.jsonl"}
    for key, items in (("train", rows[:wanted]), ("eval", rows[wanted:])):
        paths[key].write_text("".join(json.dumps(x) + "\n" for x in items))
    load_before, table = os.getloadavg()[0], []
    for family in cfg.bench.families:
        model_dir = save_family(family, work / "families" / family)
        row = {"family": family}
        specs = [{"name": f"{family}-{name}", "kind": "orpo", "model_dir": str(model_dir), "train": str(paths["train"]),
                  "eval": str(paths["eval"]), "config": cfg.to_dict(), "work": str(work / f"{family}-{name}"),
                  "precision": "fp32", "overrides": overrides} for name, overrides in (("defaults", []), ("plain", PLAIN))]
        outcome = run_rounds(specs, work, cfg.bench.repeats)  # the two legs alternate, round by round
        for name in ("defaults", "plain"):
            runs, error = outcome[f"{family}-{name}"]
            best = max(runs, key=lambda x: x["pairs_per_second"] or 0.0) if runs and not error else None
            row[name] = {"error": error} if best is None else {
                "pairs_per_second": best["pairs_per_second"], "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
                "fast_path": best.get("fast_path")}
        print(f"[bench] {_family_row(row)}", flush=True)
        table.append(row)
    report = {"hardware": hardware_summary(), "families": table,
              "setting": {"tiny": "hidden 32-64, 2 layers, byte-level vocabulary 259", "data": cfg.data.train_path,
                          "pairs": wanted, "batch": cfg.train.per_device_batch_size, "steps": cfg.train.max_steps,
                          "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length},
              "load_average": [load_before, os.getloadavg()[0]]}
    Path(cfg.output_dir, "families.json").write_text(json.dumps(report, indent=1))
    print("\n".join(["| family | pairs/s defaults | pairs/s plain | speed-up | peak RSS MB defaults | plain "
                     "| fallbacks |", "|---|---|---|---|---|---|---|", *(_family_row(r) for r in table)]))
    return report


def _family_row(row: dict) -> str:
    fast, plain = row["defaults"], row["plain"]
    if "error" in fast or "error" in plain:
        return f"| {row['family']} | failed: {(fast.get('error') or plain.get('error'))[-200:]!r} |"
    fallbacks = [f"{k}: {v[len('fallback: '):]}" for k, v in (fast["fast_path"] or {}).items() if v.startswith("fallback")]
    return (f"| {row['family']} | {fast['pairs_per_second']:.2f} | {plain['pairs_per_second']:.2f} | "
            f"{fast['pairs_per_second'] / plain['pairs_per_second']:.2f}x | {fast['peak_rss_mb']:.0f} | "
            f"{plain['peak_rss_mb']:.0f} | {'; '.join(fallbacks) or 'none'} |")
