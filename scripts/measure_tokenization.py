"""Measure tokenization throughput (docs/scaling.md): the Ray Data pipeline on N CPUs vs one in-process thread.

    PYTHONPATH=$PWD python scripts/measure_tokenization.py --cpus 2 --copies 8

Data: the HH-RLHF harmless-base test file (../shared/data/...) repeated --copies times; tokenizer: a byte-level BPE
with --vocab entries trained on that text (a Rust `tokenizers` fast tokenizer, the kind Mistral's also is).
Prints one JSON line: pairs, tokens, seconds, pairs/s and pairs/s per CPU for both paths, and the load average.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    import ray

    from orpo_ray.config import load_config
    from orpo_ray.data.records import read_pairs
    from orpo_ray.data.ray_pipeline import tokenized_datasets
    from orpo_ray.data.tokenize import tokenize_row
    from orpo_ray.embedded_tokenizer import train_bpe_tokenizer

    work = Path(tempfile.mkdtemp(prefix="orpo_tok_"))
    pairs, _ = read_pairs(str(HH), "hh")
    tok = train_bpe_tokenizer((t for p in pairs for t in (p.prompt, p.chosen, p.rejected)), args.vocab)
    tok.save_pretrained(work / "tok")
    lines = gzip.open(HH, "rt").read().splitlines()
    data = work / "hh_x.jsonl"
    data.write_text("\n".join(lines * args.copies) + "\n")
    cfg = load_config(None, [f"output_dir={work / 'out'}", f"data.train_path={data}", "data.format=hh",
                             f"model.tokenizer={work / 'tok'}", "data.max_length=1024", "data.max_prompt_length=512",
                             f"data.cache_dir={work / 'cache'}", "tracking.enabled=false"])

    start = time.perf_counter()
    outcomes = [tokenize_row(pair, tok, 1024, 512) for pair in pairs * args.copies]
    rows = [r for r in outcomes if isinstance(r, dict)]  # the rest is quarantined (reasons in the Ray run's stats)
    local_s = time.perf_counter() - start
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)

    n = len(rows)
    print(json.dumps({"pairs": n, "tokens": tokens, "in_process_1_thread_pairs_per_s": n / local_s,
                      "loadavg": os.getloadavg()}), flush=True)
    with socket.socket() as s:
        s.bind(("", 0))
        os.environ["RAY_GCS_SERVER_PORT"] = str(s.getsockname()[1])
    for attempt in range(3):  # on a loaded machine the head node's start-up can time out (Ray waits 30 s)
        try:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            if attempt == 2:
                raise
    load_before = os.getloadavg()
    start = time.perf_counter()
    _, stats = tokenized_datasets(cfg)
    ray_s = time.perf_counter() - start
    ray.shutdown()
    print(json.dumps({
        "pairs": n, "tokens": tokens, "tokens_per_pair": tokens / n, "copies": args.copies, "vocab": args.vocab,
        "in_process_1_thread": {"seconds": local_s, "pairs_per_s": n / local_s},
        "ray_data": {"cpus": args.cpus, "seconds": ray_s, "pairs_per_s": n / ray_s,
                     "pairs_per_s_per_cpu": n / ray_s / args.cpus, "train_pairs": stats["train_pairs"]},
        "loadavg_before_after": [load_before, os.getloadavg()], "machine_cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
