"""The timed steps' wait for a CPU (orpo_ray/cpu_wait.py): the sums by hand on a fake /proc, and a real wait
caused by a process spinning on this thread's CPU."""

import os
import subprocess
import sys
import time

import pytest

from orpo_ray.cpu_wait import ThreadWaitMeter, thread_schedstats


def _write(task_dir, stats):
    for tid, values in stats.items():
        (task_dir / str(tid)).mkdir(parents=True, exist_ok=True)
        (task_dir / str(tid) / "schedstat").write_text(" ".join(map(str, values)) + "\n")


def test_the_meter_sums_the_threads_that_lived_through_each_window(tmp_path):
    task = tmp_path / "task"
    _write(task, {10: (1_000, 500, 3), 11: (2_000, 0, 1)})
    meter = ThreadWaitMeter(task)
    meter.begin()
    # thread 10 ran 3 ms and waited 1 ms in 4 slices; 11 ended, 12 started within the window: neither counts
    (task / "11" / "schedstat").unlink()
    (task / "11").rmdir()
    _write(task, {10: (3_001_000, 1_000_500, 7), 12: (9_000_000, 9_000_000, 9)})
    meter.end()
    meter.begin()  # a second window: 10 ran 1 ms more, waited 1 ms more, 2 slices
    _write(task, {10: (4_001_000, 2_000_500, 9)})
    meter.end()
    got = meter.summary(seconds=0.5)
    assert got == {"share": 2e6 / 6e6, "wait_seconds": 0.002, "run_seconds": 0.004, "switches_per_second": 12.0}


def test_no_schedstat_or_no_window_gives_none(tmp_path):
    assert thread_schedstats(tmp_path / "missing") is None
    meter = ThreadWaitMeter(tmp_path / "missing")
    meter.begin()
    meter.end()
    assert meter.summary(1.0) is None
    _write(tmp_path / "task", {1: (5, 5, 1)})
    assert ThreadWaitMeter(tmp_path / "task").summary(1.0) is None  # no window measured


@pytest.mark.skipif(thread_schedstats() is None, reason="this kernel keeps no per-thread schedstat")
def test_a_process_spinning_on_this_threads_cpu_shows_as_wait():
    """This thread spins on one CPU alone, then beside a process pinned to the same CPU: the kernel splits the CPU
    between them, so this thread waits for it about half the time."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # 0: this thread
    try:
        alone = _spin_measured(0.2)
        rival = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(rival.pid, {cpu})
            time.sleep(0.05)
            contended = _spin_measured(0.4)
        finally:
            rival.kill()
            rival.wait()
    finally:
        os.sched_setaffinity(0, before)
    assert contended["share"] > 0.25 and contended["wait_seconds"] > 0.08
    assert alone["share"] < contended["share"] / 2


def _spin_measured(seconds: float) -> dict:
    meter = ThreadWaitMeter()
    meter.begin()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pass
    meter.end()
    return meter.summary(seconds)
