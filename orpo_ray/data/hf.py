"""Preference data from the Hugging Face ecosystem: `save_to_disk` directories and `hf://owner/name` hub ids.

A directory written by `datasets.Dataset.save_to_disk` holds `state.json` (its Arrow shards, in order) and
Arrow IPC stream files. `iter_saved_dataset` reads those shards record batch by record batch from a memory
map - pyarrow only, `datasets` is not imported - so a large dataset is never held in memory as a whole, and
rows keep their 1-based position (across shards) for quarantine records.

A `DatasetDict.save_to_disk` directory holds `dataset_dict.json` and one such directory per split;
`resolve_input` turns (directory, split name) into that split's directory, so everything downstream (the
in-process path, Ray Data's `parse_file`, the cache key) sees one plain local path per input.

A hub id `hf://owner/name` is used only when the Hub is reachable: `require_hub` fails at once with a clear
message when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or a TCP connect to the endpoint does not succeed
within a few seconds (DNS included). Online, the dataset is downloaded once with `datasets.load_dataset` and
saved with `save_to_disk` under the given directory, then read like any saved DatasetDict.

Pure module: pyarrow (+ `datasets` lazily, for hub downloads only); no ray, no deepspeed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from orpo_ray.config import ConfigError

HUB_PREFIX = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
BATCH_ROWS = 1024  # Arrow record batches are split to at most this many rows before becoming Python dicts


class HubUnavailableError(ConfigError):
    """A hub id was configured but the Hub cannot be used (offline mode, or not reachable)."""


# ------------------------------------------------------------------------------------- saved datasets
def is_saved_dataset(path: str | Path) -> bool:
    return (Path(path) / "state.json").is_file()


def is_dataset_dict(path: str | Path) -> bool:
    return (Path(path) / "dataset_dict.json").is_file()


def dataset_dict_splits(path: str | Path) -> list[str]:
    return list(json.loads((Path(path) / "dataset_dict.json").read_text())["splits"])


def split_dir(path: str | Path, split: str) -> Path:
    """The directory of `split` in a saved DatasetDict; the error names the splits there are."""
    splits = dataset_dict_splits(path)
    if split not in splits:
        raise ValueError(f"{path}: saved DatasetDict has no split {split!r} (splits: {splits}); "
                         "set data.train_split / data.eval_split")
    return Path(path) / split


def iter_saved_dataset(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(1-based row, record) for every row of a `Dataset.save_to_disk` directory, shard after shard."""
    import pyarrow as pa

    path = Path(path)
    if is_dataset_dict(path):
        raise ValueError(f"{path}: a saved DatasetDict (splits: {dataset_dict_splits(path)}); point at a split "
                         "directory, or set data.train_split / data.eval_split")
    if not is_saved_dataset(path):
        raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json)")
    state = json.loads((path / "state.json").read_text())
    row = 0
    for shard in state["_data_files"]:
        with pa.memory_map(str(path / shard["filename"])) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    for record in batch.slice(start, BATCH_ROWS).to_pylist():
                        row += 1
                        yield row, record


# ------------------------------------------------------------------------------------------- hub ids
def is_hub_id(path: str | None) -> bool:
    return bool(path) and str(path).startswith(HUB_PREFIX)


def hub_name(hub_id: str) -> str:
    """'hf://owner/name' (or 'hf://datasets/owner/name') -> 'owner/name'."""
    name = hub_id[len(HUB_PREFIX):].strip("/").removeprefix("datasets/")
    if name.count("/") != 1 or not all(name.split("/")):
        raise ConfigError(f"{hub_id!r}: expected a hub dataset id of the form hf://owner/name")
    return name


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connect succeeds within `timeout` seconds (DNS included), else why not."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(str(e) or type(e).__name__)

    # getaddrinfo ignores the socket timeout; a daemon thread bounds the whole probe.
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def require_hub(hub_id: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise HubUnavailableError at once unless the Hugging Face Hub can be used for `hub_id`."""
    hint = ("save the dataset with `datasets.load_dataset(...).save_to_disk(DIR)` where the Hub is reachable "
            "and set data.train_path to DIR")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise HubUnavailableError(f"{hub_id}: {var} is set, so the Hugging Face Hub is not used; {hint}")
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    if (why := _tcp_reachable(url.hostname or "", port, timeout)) is not None:
        raise HubUnavailableError(f"{hub_id}: the Hugging Face Hub at {endpoint} is not reachable ({why}); {hint}")


def download_hub_dataset(hub_id: str, root: str | Path) -> Path:
    """`load_dataset(owner/name)` saved once as a DatasetDict under root/owner__name (atomically)."""
    name = hub_name(hub_id)
    target = Path(root) / name.replace("/", "__")
    if is_dataset_dict(target):
        return target
    require_hub(hub_id)
    import datasets

    loaded = datasets.load_dataset(name)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.save_to_disk(str(tmp))
    tmp.rename(target)
    return target


# ------------------------------------------------------------------------------------------ resolving
def resolve_input(path: str, split: str, download_root: str | Path) -> str:
    """A configured data path -> one local path `records.read_pairs` reads: files and Dataset directories
    as they are, a DatasetDict directory (or hub id) as the directory of `split`."""
    if is_hub_id(path):
        path = str(download_hub_dataset(path, download_root))
    return str(split_dir(path, split)) if is_dataset_dict(path) else path


def default_eval_input(train_path: str, eval_split: str, download_root: str | Path) -> str | None:
    """With no data.eval_path: the DatasetDict's eval split if the train data has one, else None
    (then data.eval_fraction is split off the training data)."""
    root = download_hub_dataset(train_path, download_root) if is_hub_id(train_path) else Path(train_path)
    if is_dataset_dict(root) and eval_split in dataset_dict_splits(root):
        return str(Path(root) / eval_split)
    return None
