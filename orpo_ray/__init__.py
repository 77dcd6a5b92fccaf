"""orpo-ray: ORPO preference optimisation from a laptop to a Ray cluster."""

import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU matmul backend) caches a compiled primitive per distinct input shape, up to 1,024 of them.
# Packed and padded batches change shape almost every step, so the cache kept growing: the bench model's peak RSS
# went 0.9 -> 3.0 GB in 100 steps and 4.9 GB in 200 (bf16, all switches). With 64 entries it levels off near
# 1.4 GB at the same speed (README, "Memory"). Read once, at the first primitive: set here, before any torch op;
# a value the user exported wins.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
os.environ.setdefault(ONEDNN_CACHE_ENV, "64")
