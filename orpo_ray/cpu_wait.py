"""How long the training process's threads waited for a CPU that another task held, over the timed steps.

Why. With torch's OpenMP threads on every core (a one-worker run on a machine, or `--local`), any other thread that
wakes up there - Ray's raylet, GCS and helper actors, the worker's own RPC threads, a browser - takes a core from
one compute thread, and the other one waits for it at the next barrier. That is the "Ray tax" of #14: measured on a
2-core AMD EPYC (bf16, the 8k bench model), over 11 steps the two compute threads of a Ray Train worker were
switched in 2,655 and 3,444 times, against 55 and 190 in-process, and spent 0.41 and 0.53 s runnable but off the CPU;
an in-process run beside eight small processes waking 100 times a second slowed the same way. Pairs/s alone cannot
tell this from a slower host (the same VM's speed drifts 1.5x within an hour); the wait can: it is time the kernel
kept a thread that was ready to run off the CPU.

Linux keeps it per thread in /proc/<pid>/task/<tid>/schedstat: time on the CPU, time runnable but waiting (run
delay), and the number of times the thread was put on a CPU (ns, ns, count). `ThreadWaitMeter` sums the deltas of
every thread that lived through a timed step; `share` is wait / (run + wait): the fraction of the time the
process's threads wanted a CPU and did not have one. None where the kernel has no schedstat (not Linux, or
CONFIG_SCHED_INFO off).

Pure module: stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path


def thread_schedstats(task_dir: str | Path = "/proc/self/task") -> dict[int, tuple[int, int, int]] | None:
    """{thread id: (run ns, wait ns, slices)} of every thread of this process, or None without schedstat."""
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    stats = {}
    for tid in tids:
        try:
            run, wait, slices = (int(x) for x in Path(task_dir, tid, "schedstat").read_text().split()[:3])
        except (OSError, ValueError):
            continue  # the thread ended between listdir and read, or an unreadable line
        stats[int(tid)] = (run, wait, slices)
    return stats or None


class ThreadWaitMeter:
    """Accumulates the schedstat deltas of the process's threads over windows (`begin()` ... `end()`)."""

    def __init__(self, task_dir: str | Path = "/proc/self/task"):
        self.task_dir = task_dir
        self.run_ns = self.wait_ns = self.slices = 0
        self.windows = 0
        self._start: dict | None = None
        self.available = thread_schedstats(task_dir) is not None

    def begin(self) -> None:
        self._start = thread_schedstats(self.task_dir) if self.available else None

    def end(self) -> None:
        if self._start is None:
            return
        now = thread_schedstats(self.task_dir) or {}
        for tid, (run, wait, slices) in now.items():
            if tid in self._start:  # threads started or ended inside the window are left out
                r0, w0, s0 = self._start[tid]
                self.run_ns += run - r0
                self.wait_ns += wait - w0
                self.slices += slices - s0
        self.windows += 1
        self._start = None

    def summary(self, seconds: float) -> dict | None:
        """The totals over ``seconds`` of timed wall time; None when nothing was measured."""
        if not self.windows or not seconds or self.run_ns + self.wait_ns <= 0:
            return None
        return {
            "share": self.wait_ns / (self.run_ns + self.wait_ns),
            "wait_seconds": self.wait_ns / 1e9,
            "run_seconds": self.run_ns / 1e9,
            "switches_per_second": self.slices / seconds,
        }
