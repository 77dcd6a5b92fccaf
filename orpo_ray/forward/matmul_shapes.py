"""Matmul row counts that repeat from step to step where a new matmul shape costs a kernel build.

Why. On a CPU, PyTorch runs bf16 (and fp16) matmuls through oneDNN, which builds - JIT-compiles - a kernel for each
new (M, K, N) and caches it by shape. A packed batch has a different token count every step, and so has every
lm-head chunk, so nearly every matmul of a step is a new shape: on the 8k bench (tiny Llama, Intel Xeon with AMX, 2
threads, 13 steps) oneDNN built 188 kernels in 1.72 s while the matmuls themselves ran 1.53 s (`ONEDNN_VERBOSE=all`);
a [2401, 256] x [256, 688] bf16 product ran in 1.6 ms and took 5.5 ms to build. fp32 on a CPU (not oneDNN
GEMM) and CUDA (cuBLAS) build nothing per shape, so there nothing is padded.

So under CPU bf16 the packed rows are padded to a multiple of `ROW_MULTIPLE` tokens (`packing.collate_packed`; the
pad positions are outside every segment: attention gives them zeros and no loss reads them) and each lm-head chunk's
matmuls run on its rows padded with zero rows to a multiple too (`chunked_lm_head._ChunkBuffers`). On the 8k bench
that is 7% more rows through the body and 15% more through the lm-head, and few shapes: its 13 token counts (1,158
to 2,267) fall into 5 multiples of 256, its 25 lm-head chunks (147 to 1,005 rows) into 4. Measured there
(in-process bf16 leg, alternating with the code before): 57 kernel builds in 0.24 s instead of 188 in 1.72 s;
15.78, 14.77, 15.31 pairs/s against 12.50, 11.55, 11.70; peak RSS 824-826 MB against 849-852.

Pure module: torch only.
"""

from __future__ import annotations

import torch

ROW_MULTIPLE = 256
_KERNEL_PER_SHAPE = (torch.bfloat16, torch.float16)  # what oneDNN runs on a CPU (fp32 goes to MKL's GEMM)


def row_multiple(device: torch.device | str, dtype: torch.dtype) -> int:
    """The multiple to pad matmul rows to for matmuls of ``dtype`` on ``device``; 1 where shapes cost nothing."""
    return ROW_MULTIPLE if torch.device(device).type == "cpu" and dtype in _KERNEL_PER_SHAPE else 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
