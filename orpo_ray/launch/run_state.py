"""Run state: one Ray Train run per output_dir, recognised by its config, so re-running a command resumes it.

`orpo_run.json` lives next to Ray's checkpoints (`storage_path/run_name`); a finished run is returned as it is,
and an output_dir holding a run with another config is refused naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orpo_ray.config import Config, ConfigError

# Config keys that may change between the attempts of one run (re-running a command resumes it): they do
# not change what is trained. Anything else differing means a different run: refused, not silently resumed.
VOLATILE_KEYS = ("train.fail_at_step", "train.progress_bar", "tracking", "scaling.address",
                 "scaling.max_failures", "export")
RUN_STATE_FILE = "orpo_run.json"  # next to Ray's checkpoints: {"config": ..., "completed": bool}


def storage_path(cfg: Config) -> str:
    return str(Path(cfg.scaling.storage_path or Path(cfg.output_dir) / "ray").resolve())


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


def read_state(state_file: Path, cfg: Config, what: str) -> dict | None:
    """What `save_state` wrote for an earlier `what` ("run", "sweep") of this output_dir, or None.
    Raises ConfigError naming the keys if its config differs: re-running resumes only the same one."""
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    changed = changed_keys(cfg, state["config"])
    if changed:
        raise ConfigError(
            f"{cfg.output_dir} holds a {what} with a different config ({', '.join(changed[:8])}); re-running resumes "
            f"only the same {what} - use a new output_dir (or delete this one) to train with other settings")
    return state


def save_state(state_file: Path, cfg: Config, **fields) -> None:
    """{"config": run_identity(cfg), **fields} as JSON: how `read_state` recognises the same run later."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"config": run_identity(cfg), **fields}, indent=1, default=str))


def run_state_file(cfg: Config) -> Path:
    return Path(storage_path(cfg)) / run_name(cfg) / RUN_STATE_FILE


def finished_results(cfg: Config) -> dict | None:
    """results.json of an earlier, finished run of this config in this output_dir (None: train it).
    Raises ConfigError if the output_dir holds a run with another config."""
    results_file = Path(cfg.output_dir) / "results.json"
    state = read_state(run_state_file(cfg), cfg, "run")
    if state and state["completed"] and results_file.exists():
        print(f"[orpo-ray] {cfg.output_dir} already holds this finished run; nothing to do "
              "(use a new output_dir to train again)", flush=True)
        return json.loads(results_file.read_text())
    return None
