"""`output_dir` as a URI (s3://, gs://, file://, any pyarrow filesystem): the command writes to a local staging
directory and uploads what it wrote to the URI when it ends (also when it fails, so a failed run's quarantine and
partial results arrive). No Ray, no DeepSpeed: pyarrow only.

Everything derived from output_dir stays local under the staging dir (the Parquet cache `cache/`, the default
MLflow sqlite db, the default Ray Train storage `ray/`, `--local` checkpoints): those are working state, not
outputs, so `LOCAL_ONLY` names are not uploaded (the MLflow db is: it is the run's record). Put checkpoints on cloud
storage with `scaling.storage_path`.

On a cluster the driver and rank 0 may run on different hosts: rank 0 writes the results and the model into *its*
host's copy of the staging path, which the driver never sees. While a command runs, `OUTPUT_URI_ENV` and
`OUTPUT_HOST_ENV` say which URI and which host own the staging dir (Ray workers get both, launch/session.py), so
rank 0 on another host uploads its own outputs (`upload_from_other_host`) and the driver fetches results.json
back from the URI (`fetch_results`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
from pathlib import Path

from orpo_ray.config import Config, ConfigError, is_uri
from orpo_ray.launch.run_state import LOCK_FILE, STAGING_DIR

STAGING_ENV = "ORPO_RAY_STAGING_DIR"  # parent of every URI's staging dir; default ~/.cache/orpo-ray/staging
# Working state under output_dir that is not an output: checkpoints, tokenized cache, the run lock, checkpoint staging.
LOCAL_ONLY = frozenset({"ray", "cache", "checkpoints", STAGING_DIR, LOCK_FILE})
OUTPUT_URI_ENV = "ORPO_RAY_OUTPUT_URI"  # set while a command writes a URI output_dir: the URI
OUTPUT_HOST_ENV = "ORPO_RAY_OUTPUT_HOST"  # ... and the host whose staging dir the command uploads at the end


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
    saved = {k: os.environ.get(k) for k in (OUTPUT_URI_ENV, OUTPUT_HOST_ENV)}
    os.environ.update({OUTPUT_URI_ENV: uri, OUTPUT_HOST_ENV: socket.gethostname()})
    try:
        yield dataclasses.replace(cfg, output_dir=str(local))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
        if (local / LOCK_FILE).exists():  # ours is gone by now: another command is writing there (we were refused)
            print(f"[orpo-ray] not uploading {local}: another command holds it", flush=True)
        elif local.is_dir():
            print(f"[orpo-ray] uploaded {upload(local, uri)} files from {local} to {uri}", flush=True)


def upload_from_other_host(local: Path) -> int | None:
    """Rank 0's end of a run: when this host is not the one whose staging dir the command uploads, upload this
    host's outputs now (returns the file count); None when the command's own upload will carry them."""
    uri = os.environ.get(OUTPUT_URI_ENV)
    if not uri or os.environ.get(OUTPUT_HOST_ENV) == socket.gethostname():
        return None
    return upload(local, uri)


def fetch_results(local: Path) -> None:
    """The driver's side: results.json written by rank 0 on another host comes back from the URI (no-op when it
    is already here or no URI output_dir is being written)."""
    from pyarrow import fs

    uri, target = os.environ.get(OUTPUT_URI_ENV), local / "results.json"
    if target.exists() or not uri:
        return
    filesystem, root = _filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    fs.copy_files(f"{root.rstrip('/')}/results.json", str(target), source_filesystem=filesystem,
                  destination_filesystem=fs.LocalFileSystem())


def download_model(uri: str) -> Path:
    """`orpo-ray eval eval.checkpoint=URI`: the saved model under `uri` (a model dir, or a run whose `model/` is
    one) copied to this host's staging dir for that URI, whose path is returned (the model dir itself)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    root = root.rstrip("/")
    for source in (f"{root}/model", root):
        names = {info.base_name for info in filesystem.get_file_info(fs.FileSelector(source, allow_not_found=True))}
        if names & {"config.json", "adapter_config.json"}:
            target = staging_dir(uri) / ("model" if source != root else "checkpoint")
            target.mkdir(parents=True, exist_ok=True)
            fs.copy_files(source, str(target), source_filesystem=filesystem,
                          destination_filesystem=fs.LocalFileSystem())
            return target
    raise FileNotFoundError(f"eval.checkpoint={uri!r}: neither it nor its model/ holds a saved model (config.json) "
                            "or LoRA adapter (adapter_config.json)")
