"""`output_dir` as a URI (s3://, gs://, file://, any pyarrow filesystem): the command writes to a local staging
directory and uploads what it wrote to the URI when it ends (also when it fails, so a failed run's quarantine and
partial results arrive). No Ray, no DeepSpeed: pyarrow only.

Everything derived from output_dir stays local under the staging dir (the Parquet cache `cache/`, the default
MLflow sqlite db, the default Ray Train storage `ray/`, `--local` checkpoints): those are working state, not
outputs, so `LOCAL_ONLY` names are not uploaded (the MLflow db is: it is the run's record). Put checkpoints on cloud
storage with `scaling.storage_path`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path

from orpo_ray.config import Config, ConfigError, is_uri
from orpo_ray.launch.run_state import LOCK_FILE, STAGING_DIR

STAGING_ENV = "ORPO_RAY_STAGING_DIR"  # parent of every URI's staging dir; default ~/.cache/orpo-ray/staging
# Working state under output_dir that is not an output: checkpoints, tokenized cache, the run lock, checkpoint staging.
LOCAL_ONLY = frozenset({"ray", "cache", "checkpoints", STAGING_DIR, LOCK_FILE})


def staging_dir(uri: str) -> Path:
    """The local directory a URI output_dir is written to: one per URI and host, the same on every run, so
    re-running a command on this host resumes it (its checkpoints and cache live there). Its last component is the
    URI's, so run names that come from output_dir's name stay the same."""
    uri = uri.rstrip("/")
    root = Path(os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "orpo-ray" / "staging").expanduser()
    return root.resolve() / hashlib.sha1(uri.encode()).hexdigest()[:12] / (uri.rsplit("/", 1)[-1] or "run")


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError per scheme
        raise ConfigError(f"output_dir {uri!r} is not a URI pyarrow can write to: {e}") from None


def upload(local: Path, uri: str) -> int:
    """Copy every file under `local` except LOCAL_ONLY names (at any depth) to `uri`; returns the file count."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    local_fs, count = fs.LocalFileSystem(), 0
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames[:] = [d for d in dirnames if d not in LOCAL_ONLY]
        rel = Path(dirpath).relative_to(local).as_posix()
        target_dir = root.rstrip("/") if rel == "." else f"{root.rstrip('/')}/{rel}"
        files = [f for f in filenames if f not in LOCAL_ONLY]
        if files:
            filesystem.create_dir(target_dir, recursive=True)
        for name in files:
            fs.copy_files(os.path.join(dirpath, name), f"{target_dir}/{name}",
                          source_filesystem=local_fs, destination_filesystem=filesystem)
            count += 1
    return count


@contextlib.contextmanager
def staged_output(cfg: Config):
    """Yields `cfg` as it is for a local output_dir; for a URI, a copy whose output_dir is its staging dir, and
    uploads the staging dir to the URI on the way out. The one-writer lock then guards the staging dir: it stops
    a second command on this host, not one on another host (a URI has no cross-host lock)."""
    if not is_uri(cfg.output_dir):
        yield cfg
        return
    uri = cfg.output_dir.rstrip("/")
    _filesystem(uri)  # an unsupported scheme fails now, not after training
    local = staging_dir(uri)
    print(f"[orpo-ray] output_dir {uri}: writing to {local}, uploaded when the command ends", flush=True)
    try:
        yield dataclasses.replace(cfg, output_dir=str(local))
    finally:
        if (local / LOCK_FILE).exists():  # ours is gone by now: another command is writing there (we were refused)
            print(f"[orpo-ray] not uploading {local}: another command holds it", flush=True)
        elif local.is_dir():
            print(f"[orpo-ray] uploaded {upload(local, uri)} files from {local} to {uri}", flush=True)
