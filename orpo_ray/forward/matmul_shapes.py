"""Matmul row counts that repeat from step to step where a new matmul shape costs a kernel build.

Why. On a CPU, PyTorch runs bf16 (and fp16) matmuls through oneDNN, which builds - JIT-compiles - a kernel for each
new (M, K, N) and caches it by shape. A packed batch has a different token count every step, and so has every
lm-head chunk, so nearly every matmul of a step is a new shape: on the 8k bench (tiny Llama, Intel Xeon with AMX, 2
threads, 13 steps) oneDNN built 188 kernels in 1.72 s while the matmuls themselves ran 1.53 s (`ONEDNN_VERBOSE=all`);
a [2401, 256] x [256, 688] bf16 product ran in 1.6 ms and took 5.5 ms to build. fp32 matmuls on a CPU
(`ONEDNN_VERBOSE` lists none: they do not go through oneDNN) and CUDA's build nothing per shape: not padded there.

So under CPU bf16 the packed rows are padded (`packing.collate_packed`; the pad positions are outside every segment:
attention gives them zeros and no loss reads them) to `padded_rows`: a multiple of `ROW_MULTIPLE` tokens, or of an
eighth of the length's power of two below that, so a short batch gains at most 1/8 more rows (a 150-token batch of
a small model would otherwise nearly double) and a long one a few shapes per octave. Each lm-head chunk's matmuls run
on its rows padded with zero rows to a multiple of `ROW_MULTIPLE` (`chunked_lm_head._ChunkBuffers`): a chunk has at
most `lm_head_chunk_size` rows, so that is 4 shapes at the default 1,024, and an lm-head shape costs the most to build
(15-22 ms at V=8,192). Measured on the 8k bench with a plain multiple of 256 rows (in-process bf16 leg, alternating
with the code before): 57 kernel builds in 0.24 s instead of 188 in 1.72 s; 15.78, 14.77, 15.31 pairs/s against
12.50, 11.55, 11.70; peak RSS 824-826 MB against 849-852; its 13 token counts (1,158 to 2,267) fell into 5 multiples
of 256 (7% more rows), its 25 lm-head chunks (147 to 1,005 rows) into 4 (15% more).

Pure module: torch only.
"""

from __future__ import annotations

import torch

ROW_MULTIPLE = 256
BUCKETS_PER_OCTAVE = 8  # `padded_rows` below 8 x ROW_MULTIPLE: at most 1/8 more rows
_KERNEL_PER_SHAPE = (torch.bfloat16, torch.float16)  # what oneDNN runs on a CPU (fp32 does not go through it)


def row_multiple(device: torch.device | str, dtype: torch.dtype) -> int:
    """The multiple to pad matmul rows to for matmuls of ``dtype`` on ``device``; 1 where shapes cost nothing."""
    return ROW_MULTIPLE if torch.device(device).type == "cpu" and dtype in _KERNEL_PER_SHAPE else 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_rows(n: int, multiple: int) -> int:
    """``n`` rows rounded up to a multiple of ``multiple``, or of 1/`BUCKETS_PER_OCTAVE` of n's power of two when
    that is smaller (1 leaves ``n`` as it is)."""
    if multiple <= 1 or n < 1:
        return n
    return round_up(n, min(multiple, max(1, (1 << (n.bit_length() - 1)) // BUCKETS_PER_OCTAVE)))
