"""How long a training process's OpenMP threads spin at a barrier before they sleep (`scaling.omp_spin_count`).

Why. torch (and oneDNN and MKL inside it) runs each op on libgomp's thread team, and the team meets at a barrier
after every parallel region. A thread that arrives first spins there - by default up to 300,000 rounds
(GOMP_SPINCOUNT), milliseconds - before it sleeps. That is right on a machine with nothing else to run, and it is
what a run gets in-process. Through Ray the training threads share the cores with Ray's own processes (raylet, GCS,
Ray Train's and Ray Data's helper actors, each waking ~100 times a second): each wake-up preempts one of the two
threads, and its partner then spins at the next barrier for as long as the preemption lasts, so every millisecond
Ray takes costs the team two. With a short spin the partner sleeps instead and its core runs the other wake-ups
that were waiting. Measured on the 8k bench legs (2-core AMD EPYC, bf16, 36 steps, alternating, pairs/s): through
Ray 20.68, 20.30, 20.25 with libgomp's 300,000; 24.14, 22.41, 22.64 with 10,000 (3,000: 25.19, 23.05, 22.51;
1,000: 21.73, 20.98, 21.51, where sleeping and waking at every barrier starts to cost); in-process 24.65, 29.03,
28.27 against 23.91, 29.02, 28.45 with 10,000 (unchanged); OMP_WAIT_POLICY=PASSIVE (no spin) cost both paths ~20%.

A process reads GOMP_SPINCOUNT once, when libgomp loads, so the value goes into the environment a training process
starts with: the Ray workers' through the job's runtime env, `train --local`'s by restarting itself (cli.py), like
the allocator (allocator.py). A user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept.

Pure module (stdlib only): the launcher, `orpo-ray plan` and the config share it.
"""

from __future__ import annotations

from typing import Mapping, Union

SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
AUTO_SPIN_COUNT = 10_000  # see the module docstring for the measurements behind it
LIBGOMP_DEFAULT_SPIN_COUNT = 300_000  # libgomp's own when neither variable is set (what `active` then reports)


def omp_wait_env(setting: Union[int, str], exported: Mapping[str, str]) -> dict[str, str]:
    """The variables a training process starts with for ``scaling.omp_spin_count`` (`exported`: the launching
    process's environment): 'auto' -> AUTO_SPIN_COUNT unless the user exported GOMP_SPINCOUNT or OMP_WAIT_POLICY
    (then nothing: theirs stays); an int -> that count, whatever was exported."""
    if setting == "auto":
        if SPIN_COUNT_ENV in exported or WAIT_POLICY_ENV in exported:
            return {}
        return {SPIN_COUNT_ENV: str(AUTO_SPIN_COUNT)}
    return {SPIN_COUNT_ENV: str(int(setting))}


def describe(setting: Union[int, str], exported: Mapping[str, str]) -> str:
    """One line for the plan: the spin count a training process gets, and why."""
    env = omp_wait_env(setting, exported)
    if env:
        why = "scaling.omp_spin_count" if setting != "auto" else "auto: Ray's processes share the cores"
        return f"{env[SPIN_COUNT_ENV]} ({why})"
    if SPIN_COUNT_ENV in exported:
        return f"{exported[SPIN_COUNT_ENV]} (exported {SPIN_COUNT_ENV})"
    return f"libgomp's own (exported {WAIT_POLICY_ENV}={exported[WAIT_POLICY_ENV]})"


def active(environ: Mapping[str, str]) -> str:
    """The spin count this process's libgomp runs with, for the plan a run records (results.json, MLflow)."""
    if SPIN_COUNT_ENV in environ:
        return environ[SPIN_COUNT_ENV]
    if WAIT_POLICY_ENV in environ:
        return f"libgomp's own (OMP_WAIT_POLICY={environ[WAIT_POLICY_ENV]})"
    return f"{LIBGOMP_DEFAULT_SPIN_COUNT} (libgomp's default)"
