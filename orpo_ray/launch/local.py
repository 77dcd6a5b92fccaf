"""`orpo-ray train --local`: the training loop in this process, under the same rules as a Ray run.

One writer per output_dir (the lock), and re-running resumes only the same run: an output_dir holding a run with
another config is refused naming the keys that differ, and a finished one is returned as it is. No Ray import.
"""

from __future__ import annotations

from orpo_ray.config import Config, with_absolute_paths
from orpo_ray.launch.run_state import finished_results, output_dir_lock, run_state_file, save_state


def run_local(cfg: Config) -> dict:
    cfg = with_absolute_paths(cfg)
    with output_dir_lock(cfg.output_dir):
        finished = finished_results(cfg, local=True)
        if finished is not None:
            return finished
        save_state(run_state_file(cfg, local=True), cfg, completed=False)
        from orpo_ray.train.loop import train_loop_per_worker  # heavy (transformers): only once there is work

        results = train_loop_per_worker(cfg.to_dict())
        save_state(run_state_file(cfg, local=True), cfg, completed=True)
        return results
