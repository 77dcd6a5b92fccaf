"""scaling.allocator: which malloc the Ray workers get (orpo_ray/allocator.py), and how the launcher hands it to
them. The real worker's memory map is checked by tests/integration/test_driver_log.py (a local instance: jemalloc)
and tests/integration/test_job_submit.py (a cluster: the system's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_ray.allocator import JEMALLOC_CONF, active_allocator, bundled_jemalloc, worker_allocator
from orpo_ray.config import ConfigError, load_config

LIB = "/opt/ray/core/libjemalloc.so"


@pytest.mark.parametrize("setting, local, inherited, library, name, preload", [
    ("auto", True, None, LIB, "jemalloc", LIB),
    ("auto", False, None, LIB, "system", None),  # a cluster: this machine's path may not exist on another node
    ("auto", True, "/usr/lib/libtcmalloc.so", LIB, "system", None),  # the user's preload is left as it is
    ("auto", True, None, None, "system", None),
    ("jemalloc", False, None, LIB, "jemalloc", LIB),
    ("jemalloc", True, "/x/libfoo.so", LIB, "jemalloc", f"{LIB}:/x/libfoo.so"),
    ("jemalloc", True, f"/x/libfoo.so:{LIB}", LIB, "jemalloc", f"{LIB}:/x/libfoo.so"),  # listed once
    ("system", True, None, LIB, "system", None),
])
def test_worker_allocator_resolution(setting, local, inherited, library, name, preload):
    a = worker_allocator(setting, local_instance=local, inherited_preload=inherited, library=library)
    assert (a.name, a.preload) == (name, preload) and a.reason


def test_asking_for_jemalloc_without_the_library_names_what_is_missing():
    with pytest.raises(FileNotFoundError, match=r"scaling.allocator=jemalloc: Ray's libjemalloc.so was not found"):
        worker_allocator("jemalloc", local_instance=True, inherited_preload=None, library=None)


def test_the_environment_a_process_needs_for_its_malloc():
    jemalloc = worker_allocator("auto", local_instance=True, inherited_preload=None, library=LIB)
    assert jemalloc.env({}) == {"LD_PRELOAD": LIB, "MALLOC_CONF": JEMALLOC_CONF}
    assert jemalloc.env({"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"  # the user's settings stay
    assert jemalloc.env({"MALLOC_CONF": ""})["MALLOC_CONF"] == JEMALLOC_CONF  # an empty one sets nothing
    assert worker_allocator("system", local_instance=True, inherited_preload=None, library=LIB).env({}) == {}


# A C loop (ctypes: no torch, so it starts in ~50 ms) that allocates 32 MB, writes every page and frees it, ten
# times, and prints the minor page faults the last nine took: what a training step's freed tensors cost the next one.
_REFAULT_PROBE = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 32 << 20
def once():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(ctypes.c_void_p(p))
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _python_under(env: dict, code: str) -> str:
    """What `python -c code` prints, started with `env` as its only malloc settings (none inherited from here)."""
    run_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")} | env
    return subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True,
                          check=True).stdout.strip()


def _refaults(env: dict) -> int:
    return int(_python_under(env, _REFAULT_PROBE))


def test_jemalloc_under_the_workers_settings_keeps_freed_pages():
    """Ray's jemalloc with its own defaults hands a freed 32 MB block back to the OS, so writing the next one faults
    all 8,192 pages in again; with JEMALLOC_CONF the pages stay and the next block reuses them."""
    pages = (32 << 20) // os.sysconf("SC_PAGE_SIZE")
    env = worker_allocator("auto", local_instance=True, inherited_preload=None, library=bundled_jemalloc()).env({})
    assert _refaults({"LD_PRELOAD": env["LD_PRELOAD"]}) >= 9 * pages * 0.9  # jemalloc's defaults
    assert _refaults(env) < pages // 4


def _active_allocator_under(env: dict) -> str:
    return _python_under(env, "from orpo_ray.allocator import active_allocator; print(active_allocator())")


def test_a_process_reports_whether_its_jemalloc_keeps_freed_pages():
    """What a worker's plan line shows (`| malloc ...`): read from the malloc it runs on, not from what was asked."""
    env = worker_allocator("auto", local_instance=True, inherited_preload=None, library=bundled_jemalloc()).env({})
    assert _active_allocator_under(env) == "jemalloc (keeps freed pages)"
    assert _active_allocator_under({"LD_PRELOAD": env["LD_PRELOAD"]}) == "jemalloc"
    assert _active_allocator_under({}) == "system"


def test_the_installed_ray_ships_jemalloc():
    path = bundled_jemalloc()
    assert path is not None and Path(path).is_file() and Path(path).parent.parent.name == "ray"


def test_active_allocator_reads_the_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert active_allocator(str(maps)) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /venv/ray/core/libjemalloc.so\n")
    assert active_allocator(str(maps)) == "jemalloc"
    assert active_allocator(str(tmp_path / "absent")) == "system"
    assert active_allocator() == "system"  # this test process: nothing was preloaded


def test_an_unknown_allocator_is_rejected():
    with pytest.raises(ConfigError, match="allocator"):
        load_config(None, ["scaling.allocator=tcmalloc"])


@pytest.mark.parametrize("overrides, address, preloaded", [
    ([], None, True),
    (["scaling.allocator=system"], None, False),
    ([], "10.0.0.1:6379", False),
    (["scaling.allocator=jemalloc"], "10.0.0.1:6379", True),
])
def test_ensure_ray_puts_the_allocator_in_the_jobs_runtime_env(monkeypatch, ray_init_calls, overrides, address,
                                                                preloaded):
    """The job's runtime env reaches every worker Ray starts for it (Ray Train's and Ray Data's)."""
    from orpo_ray.launch import session

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    session.ensure_ray(load_config(None, overrides))
    (kwargs,) = ray_init_calls
    env = kwargs["runtime_env"]["env_vars"]
    assert env.get("LD_PRELOAD") == (bundled_jemalloc() if preloaded else None)
    assert env.get("MALLOC_CONF") == (JEMALLOC_CONF if preloaded else None)


@pytest.mark.parametrize("overrides, exported, preloaded", [
    ([], None, True),
    (["scaling.allocator=system"], None, False),
    ([], "/usr/lib/libtcmalloc.so", False),  # the user's choice (and a process already restarted) stays
    (["scaling.allocator=jemalloc"], "JEMALLOC", False),  # restarted under it already: no second restart
    (["scaling.allocator=jemalloc"], "/usr/lib/libtcmalloc.so", True),
])
def test_an_in_process_run_starts_under_the_workers_allocator(monkeypatch, overrides, exported, preloaded):
    from orpo_ray.launch.session import local_process_env

    if exported:
        monkeypatch.setenv("LD_PRELOAD", bundled_jemalloc() if exported == "JEMALLOC" else exported)
    else:
        monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("MALLOC_CONF", JEMALLOC_CONF)  # as a restarted process has it
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # so has its OpenMP spin count (test_omp_wait.py)
    env = local_process_env(load_config(None, overrides))
    assert (env is not None) is preloaded
    if env is not None:
        assert env["LD_PRELOAD"].split(":")[0] == bundled_jemalloc() and env["PATH"] == os.environ["PATH"]
        assert env["MALLOC_CONF"] == JEMALLOC_CONF


def test_an_in_process_run_restarts_for_the_allocators_settings_too(monkeypatch):
    """Started under the library but without its settings: restarted once with them, the user's own kept."""
    from orpo_ray.launch.session import local_process_env

    monkeypatch.setenv("LD_PRELOAD", bundled_jemalloc())
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    assert local_process_env(load_config(None, ["scaling.allocator=jemalloc"]))["MALLOC_CONF"] == JEMALLOC_CONF
    monkeypatch.setenv("MALLOC_CONF", "narenas:2")
    assert local_process_env(load_config(None, ["scaling.allocator=jemalloc"])) is None


@pytest.mark.parametrize("kind, ray, overrides, preloaded", [
    ("orpo", False, [], True),                                # as `train --local` runs
    ("orpo", False, ["scaling.allocator=system"], False),
    ("orpo", True, [], False),                                # the run gives its workers their malloc
    ("orpo", False, ["scaling.num_workers=2"], False),        # a multi-worker leg runs through Ray too
    ("trl", False, [], False),                                # TRL as its users run it
])
def test_bench_legs_run_on_the_allocator_their_command_would(monkeypatch, kind, ray, overrides, preloaded):
    from orpo_ray.commands.bench import leg_env

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    spec = {"kind": kind, "ray": ray, "config": load_config(None, []).to_dict(), "overrides": overrides}
    env = leg_env(spec)
    assert (env is not None and env.get("LD_PRELOAD") == bundled_jemalloc()) is preloaded
