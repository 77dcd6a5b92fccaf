"""orpo-ray: ORPO preference optimisation from a laptop to a Ray cluster."""

import os

__version__ = "0.1.0"

# Two caches in PyTorch's CPU matmul stack grow with every distinct input shape, and packed and padded batches
# change shape almost every step, so both need a bound (README, "Memory over long runs"):
# - oneDNN's primitive cache (1,024 compiled primitives by default): the bench model's peak RSS went 0.9 -> 3.0 GB
#   in 100 steps and 4.9 GB in 200 (bf16, all switches); with 64 entries it levels off at the same speed.
# - ideep's LRU cache (LRU_CACHE_CAPACITY, 1,024 entries by default), which PyTorch's bf16 matmuls go through:
#   on the 8k bench leg (bf16, 12 steps) 1,460 MB peak RSS by default, 990 MB with 8 entries, at the same
#   pairs/s; fp32 matmuls (MKL) do not use it. 0 crashes ideep, so the bound is 8, not 0.
# Both are read once, at the first matmul: set here, before any torch op; a value the user exported wins.
CACHE_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "8"}
for _name, _bound in CACHE_BOUNDS.items():
    os.environ.setdefault(_name, _bound)
