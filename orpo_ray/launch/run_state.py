"""Run state: one Ray Train run per output_dir, recognised by its config, so re-running a command resumes it.

`orpo_run.json` lives next to Ray's checkpoints (`storage_path/run_name`); a finished run is returned as it is,
and an output_dir holding a run with another config is refused naming the keys that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from orpo_ray.config import Config, ConfigError, is_uri

# Config keys that may change between the attempts of one run (re-running a command resumes it): they do
# not change what is trained. Anything else differing means a different run: refused, not silently resumed.
VOLATILE_KEYS = ("train.fail_at_step", "train.progress_bar", "tracking", "scaling.address",
                 "scaling.max_failures", "export")
RUN_STATE_FILE = "orpo_run.json"  # next to Ray's checkpoints: {"config": ..., "completed": bool}
LOCK_FILE = ".orpo_run.lock"  # in output_dir while a run writes there: {"host", "pid", "started"}
STAGING_DIR = ".checkpoint_staging"  # where ranks write a checkpoint before Ray Train persists it


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps checkpoints. A URI (s3://, gs://, file://, any pyarrow filesystem) goes to Ray Train
    as it is - resolving it as a path would turn s3://b/x into <cwd>/s3:/b/x; a local path is made absolute."""
    if cfg.scaling.storage_path and is_uri(cfg.scaling.storage_path):
        return cfg.scaling.storage_path
    return str(Path(cfg.scaling.storage_path or Path(cfg.output_dir) / "ray").expanduser().resolve())


def checkpoint_staging_root(cfg: Config) -> Path:
    """Local directory where each rank writes a checkpoint before `ray.train.report` persists it: next to the
    checkpoints when storage_path is local (same disk, one copy), else under output_dir (always local) - never the
    system temp dir, which on a pod is small and which nothing would clean after a failed save."""
    local = cfg.scaling.storage_path is None or not is_uri(cfg.scaling.storage_path)
    return (Path(storage_path(cfg)) / run_name(cfg) if local else Path(cfg.output_dir)) / STAGING_DIR


def run_name(cfg: Config) -> str:
    """Ray Train run name, one per output_dir: Ray Train V2 resumes a run from its latest checkpoint when
    the same (name, storage_path) is fitted again - that is how re-running a command resumes - and a
    shared `scaling.storage_path` must not hand one output_dir's checkpoints to another."""
    out = str(Path(cfg.output_dir).resolve())
    return f"orpo-{Path(out).name}-{hashlib.sha1(out.encode()).hexdigest()[:8]}"


def run_identity(cfg: Config) -> dict:
    """The config without VOLATILE_KEYS: equal identities = the same training run."""
    flat = _flatten(cfg.to_dict())
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in VOLATILE_KEYS)}


def changed_keys(cfg: Config, stored_identity: dict) -> list[str]:
    """Keys whose value differs between cfg and an identity stored (as JSON) by an earlier run."""
    mine = json.loads(json.dumps(run_identity(cfg)))  # same JSON types as the stored one
    return sorted(k for k in mine.keys() | stored_identity.keys() if mine.get(k) != stored_identity.get(k))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _filesystem(path: str | Path):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(str(path)) if is_uri(str(path)) else (fs.LocalFileSystem(), str(path))


def read_text(path: str | Path) -> str | None:
    """Contents of a local file or a storage URI, or None if there is none."""
    filesystem, inner = _filesystem(path)
    from pyarrow import fs

    if filesystem.get_file_info(inner).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str | Path, text: str) -> None:
    filesystem, inner = _filesystem(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as f:
        f.write(text.encode())


def read_state(state_file: str | Path, cfg: Config, what: str) -> dict | None:
    """What `save_state` wrote for an earlier `what` ("run", "sweep") of this output_dir, or None.
    Raises ConfigError naming the keys if its config differs: re-running resumes only the same one."""
    text = read_text(state_file)
    if text is None:
        return None
    state = json.loads(text)
    changed = changed_keys(cfg, state["config"])
    if changed:
        raise ConfigError(
            f"{cfg.output_dir} holds a {what} with a different config ({', '.join(changed[:8])}); re-running resumes "
            f"only the same {what} - use a new output_dir (or delete this one) to train with other settings")
    return state


def save_state(state_file: str | Path, cfg: Config, **fields) -> None:
    """{"config": run_identity(cfg), **fields} as JSON: how `read_state` recognises the same run later."""
    write_text(state_file, json.dumps({"config": run_identity(cfg), **fields}, indent=1, default=str))


def run_state_file(cfg: Config, local: bool = False) -> str:
    """The run-state file: next to Ray Train's checkpoints, or (`--local` runs) next to output_dir/checkpoints."""
    if local:
        return str(Path(cfg.output_dir) / "checkpoints" / RUN_STATE_FILE)
    return f"{storage_path(cfg).rstrip('/')}/{run_name(cfg)}/{RUN_STATE_FILE}"


def finished_results(cfg: Config, local: bool = False) -> dict | None:
    """results.json of an earlier, finished run of this config in this output_dir (None: train it).
    Raises ConfigError if the output_dir holds a run with another config: the same check for Ray and `--local`."""
    results_file = Path(cfg.output_dir) / "results.json"
    state = read_state(run_state_file(cfg, local), cfg, "run")
    if state and state["completed"] and results_file.exists():
        print(f"[orpo-ray] {cfg.output_dir} already holds this finished run; nothing to do "
              "(use a new output_dir to train again)", flush=True)
        return json.loads(results_file.read_text())
    return None


# ------------------------------------------------------------------------------------------- one writer
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path):
    """One writer per output_dir: two runs there would interleave checkpoints, results.json and the model.

    The lock file is created with O_EXCL (atomic on local and NFSv3+ filesystems) and holds the holder's host and
    pid. A lock left by a dead process on this host (a killed run never reaches `finally`) is taken over; one from
    another host cannot be checked from here, so the message says which file to delete if that run is gone.
    """
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                print(f"[orpo-ray] removing stale lock {path} (pid {holder['pid']} on {holder['host']} is gone)",
                      flush=True)
                path.unlink(missing_ok=True)
                continue
            raise ConfigError(
                f"{output_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): one run per output_dir. Wait for "
                f"it, or use another output_dir; if that run is gone, delete {path}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
