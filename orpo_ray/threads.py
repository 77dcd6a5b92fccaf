"""A Ray Train worker's torch threads, set without turning MKL's dynamic threading off.

Why. `torch.set_num_threads(n)` also calls `mkl_set_dynamic(false)` (ATen's ParallelOpenMP.cpp), and once it has
been called, every thread's first parallel op calls it again. With dynamic threading off, MKL runs every fp32
matmul on all n threads, small ones included; with it on (MKL's default, and what an in-process run has since it
never calls `set_num_threads`) MKL picks the threads per call. On the 8k bench (tiny Llama, 2-core Intel Xeon,
fp32) the Ray worker ran other MKL kernels than the in-process leg on identical inputs (perf: `sgemm_kernel_nocopy_TN`
instead of `_NT`/`_NN`, 17% more samples in `sgemm_kernel_0`; `MKL_VERBOSE=1` printed `Dyn:0` against `Dyn:1`), and
through Ray, alternating legs: 19.29, 18.47, 17.49 pairs/s with this module against 15.59, 14.11, 15.86 with a plain
`torch.set_num_threads`.

Ray sets a worker's OMP_NUM_THREADS to its CPUs, so torch's pool usually has the right size already and nothing is
called. Where it has not (a user's own OMP_NUM_THREADS), the count is set and MKL's dynamic threading turned back
on, after this thread's first-use initialisation has run (`torch.get_num_threads` runs it), so that nothing in this
thread turns it off again.

Pure module: torch and ctypes only.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def _mkl_set_dynamic():
    """MKL's C `MKL_Set_Dynamic(int)`, linked into libtorch_cpu; None where torch has no MKL (e.g. aarch64)."""
    if not torch.backends.mkl.is_available():
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.CDLL(str(library)).MKL_Set_Dynamic
    except (OSError, AttributeError):
        return None


def use_compute_threads(n: int) -> None:
    """Give torch's intra-op pool ``n`` threads, keeping MKL's dynamic threading on."""
    if torch.get_num_threads() == n:  # also runs this thread's lazy thread initialisation (see the docstring)
        return
    torch.set_num_threads(n)
    set_dynamic = _mkl_set_dynamic()
    if set_dynamic is not None:
        set_dynamic(1)
