"""Which malloc the Ray workers of a run use (`scaling.allocator`).

Why not glibc's: a training step allocates and frees tensors of sizes that change with every batch (packed rows of
different lengths), and glibc's heap fragments under that - its free chunks sit between live ones in sizes the next
step cannot use, so the heap keeps growing. On the 8k bench leg (bf16, in-process) glibc's heap held 160 MB free at
the step's peak; under jemalloc its free-but-resident memory was ~30 MB, and the peak RSS went from 938-945 MB to
819-821 MB at the same or better speed (32k: 1,697-1,699 to 1,453-1,454 MB). Ray ships jemalloc 5.3
(`ray/core/libjemalloc.so`, which it preloads into its own object store when asked), so every orpo-ray install has it.

A process picks its malloc when it starts: the library goes into the workers' LD_PRELOAD through the job's runtime
env, never into the driver already running. Pure module (no ray import): the launcher and `orpo-ray plan` share it,
and the worker reports what it actually got (`active_allocator`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

JEMALLOC_NAME = "libjemalloc.so"


def bundled_jemalloc() -> str | None:
    """Path of the jemalloc that Ray's wheel ships, without importing ray (None when absent)."""
    spec = importlib.util.find_spec("ray")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "core" / JEMALLOC_NAME
        if path.is_file():
            return str(path)
    return None


@dataclass(frozen=True)
class WorkerAllocator:
    name: str  # "jemalloc" or "system"
    preload: str | None  # the workers' LD_PRELOAD, None to leave it as inherited
    reason: str


def worker_allocator(setting: str, *, local_instance: bool, inherited_preload: str | None,
                     library: str | None) -> WorkerAllocator:
    """Resolve `scaling.allocator` for the workers of a run.

    setting: "auto", "jemalloc" or "system". local_instance: the run starts its own Ray instance on this machine
    (so the library path is valid where the workers run); on a cluster 'auto' keeps the system malloc, as the
    path is this machine's and another node may have Ray elsewhere. inherited_preload: the LD_PRELOAD the user
    exported (kept: 'auto' leaves it alone; 'jemalloc' puts jemalloc first). library: Ray's bundled jemalloc."""
    if setting == "system":
        return WorkerAllocator("system", None, "scaling.allocator=system")
    if setting == "auto":
        if inherited_preload:
            return WorkerAllocator("system", None, f"LD_PRELOAD={inherited_preload} was exported: kept as it is")
        if not local_instance:
            return WorkerAllocator("system", None, "a cluster: scaling.allocator=jemalloc preloads Ray's jemalloc "
                                                   "when it is installed at the same path on every node")
    if library is None:
        if setting == "jemalloc":
            raise FileNotFoundError(f"scaling.allocator=jemalloc: Ray's {JEMALLOC_NAME} was not found in its package "
                                    "(ray/core/); set scaling.allocator=system or auto")
        return WorkerAllocator("system", None, f"Ray's {JEMALLOC_NAME} was not found in its package")
    # Already preloaded (a restarted `train --local`, a worker's child): the same list, so nothing restarts again.
    preload = ":".join([library, *(p for p in (inherited_preload or "").split(":") if p and p != library)])
    return WorkerAllocator("jemalloc", preload, f"Ray's bundled {JEMALLOC_NAME}, scaling.allocator={setting}")


def active_allocator(maps_path: str = "/proc/self/maps") -> str:
    """The malloc this process runs on, as its memory map shows it: 'jemalloc', 'tcmalloc', 'mimalloc', or
    'system' (glibc's, or a platform without /proc)."""
    try:
        text = Path(maps_path).read_text()
    except OSError:
        return "system"
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in text:
            return name
    return "system"
