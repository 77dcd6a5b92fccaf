"""orpo_ray/threads.py: a Ray Train worker's torch threads, with MKL's dynamic threading left on (here, not in
tests/unit: each case starts an interpreter that imports torch, 2-3 s).

Each case runs in its own interpreter (thread settings are process-wide and cannot be undone), in a second thread
as Ray Train runs the training function, and reads MKL's own report of a matmul (`MKL_VERBOSE=1`: `Dyn:1` or `Dyn:0`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

_PROBE = """
import threading, torch
from orpo_ray.threads import use_compute_threads

def worker():
    {setup}
    a = torch.randn(256, 256)
    a @ a  # the first matmul of the training thread (its first parallel op, too)
    a @ a
    print("THREADS", torch.get_num_threads(), flush=True)

thread = threading.Thread(target=worker)
thread.start()
thread.join()
"""


def _in_a_worker_thread(setup: str, omp_num_threads: str) -> tuple[int, str]:
    """(torch's thread count, MKL's dynamic flag of the last matmul) after `setup` ran in a new thread of a process
    started with OMP_NUM_THREADS as Ray starts its workers."""
    env = os.environ | {"OMP_NUM_THREADS": omp_num_threads, "MKL_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], env=env, capture_output=True,
                         text=True, check=True).stdout
    dynamic = re.findall(r"Dyn:(\d)", out)
    assert dynamic, f"MKL printed no verbose line:\n{out}"
    return int(re.search(r"THREADS (\d+)", out).group(1)), dynamic[-1]


@pytest.mark.parametrize("started_with", ["2", "1"])
def test_the_worker_gets_its_threads_and_mkl_keeps_its_dynamic_threading(started_with):
    """Started with the right count (Ray's OMP_NUM_THREADS) or another one (a user's), the worker ends with 2 threads
    and MKL still picks the threads per matmul."""
    assert _in_a_worker_thread("use_compute_threads(2)", started_with) == (2, "1")


def test_a_plain_set_num_threads_turns_mkl_dynamic_threading_off():
    """Why the module exists: torch.set_num_threads turns it off, even when the count does not change."""
    assert _in_a_worker_thread("torch.set_num_threads(2)", "2") == (2, "0")
