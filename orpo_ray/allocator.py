"""Which malloc the Ray workers of a run use (`scaling.allocator`).

Why not glibc's: a training step allocates and frees tensors of sizes that change with every batch (packed rows of
different lengths), and glibc's heap fragments under that - its free chunks sit between live ones in sizes the next
step cannot use, so the heap keeps growing. On the 8k bench leg (bf16, in-process) glibc's heap held 160 MB free at
the step's peak; under jemalloc its free-but-resident memory was ~30 MB, and the peak RSS went from 938-945 MB to
819-821 MB at the same or better speed (32k: 1,697-1,699 to 1,453-1,454 MB). Ray ships jemalloc 5.3
(`ray/core/libjemalloc.so`, which it preloads into its own object store when asked), so every orpo-ray install has it.

Its settings (`JEMALLOC_CONF`, the workers' MALLOC_CONF): freed pages stay with jemalloc for the next allocation
instead of going back to the OS. Why: a step frees and allocates the same few hundred MB again every step; by
default jemalloc hands freed extents of 8 MB or more back at once (its oversize arena) and the rest within 10 s,
so every step page-faulted ~50 MB in again - 140-175 k minor faults and 0.4-0.6 s of system time over the 11 timed
steps of the 8k bench leg (in-process, fp32, Intel Xeon), against 15-19 k and 0.05-0.2 s kept (pairs/s 16.2-18.6
against 14.1-15.5 in alternating runs; through Ray 14.5 against 11.7). Kept pages are reused before new ones are
touched, so the resident peak does not grow: 703 MB against 697-706 with all sizes in the common arenas
(`oversize_threshold:0`); with the oversize arena kept apart, its idle extents added 15-20 MB.

A process picks its malloc when it starts: the library goes into the workers' LD_PRELOAD through the job's runtime
env, never into the driver already running. Pure module (no ray import): the launcher and `orpo-ray plan` share it,
and the worker reports what it actually got (`active_allocator`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

JEMALLOC_NAME = "libjemalloc.so"
# Keep freed pages for reuse (dirty_decay_ms:-1), in the common arenas for every size (oversize_threshold:0). See above.
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1"


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

    def env(self, exported: Mapping[str, str]) -> dict[str, str]:
        """The variables a process needs to start on this malloc: LD_PRELOAD, and jemalloc's settings unless the user
        exported their own MALLOC_CONF (`exported`: the launching process's environment; an empty one sets nothing
        and is replaced). Empty for 'system'."""
        if self.preload is None:
            return {}
        return {"LD_PRELOAD": self.preload, "MALLOC_CONF": exported.get("MALLOC_CONF") or JEMALLOC_CONF}


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
    'system' (glibc's, or a platform without /proc); 'jemalloc (keeps freed pages)' when the jemalloc this process
    runs says it was started with JEMALLOC_CONF's decay (so a run's plan shows that the settings arrived)."""
    try:
        text = Path(maps_path).read_text()
    except OSError:
        return "system"
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in text:
            return "jemalloc (keeps freed pages)" if name == "jemalloc" and jemalloc_keeps_freed_pages() else name
    return "system"


def jemalloc_keeps_freed_pages() -> bool | None:
    """Whether this process's jemalloc never hands freed pages back (its opt.dirty_decay_ms is -1), asked through
    its `mallctl`; None when no jemalloc is loaded (a preloaded one exports the symbol to the whole process)."""
    import ctypes

    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is None:
        return None
    value, size = ctypes.c_ssize_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    if mallctl(b"opt.dirty_decay_ms", ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    return value.value == -1
