"""What a run prints: quiet through Ray unless `--verbose` (env ORPO_RAY_VERBOSE=1, which Ray workers inherit).

Through Ray a worker's stdout is a pipe that Ray forwards line by line, so every tqdm refresh became a line of
the driver's console (hundreds per run) between Ray Data's two INFO lines per dataset execution. Quiet means:
the bar refreshes at most every PROGRESS_INTERVAL_S when stdout is not a terminal, and Ray Data's per-dataset
lines are off (the loop's one `[orpo-ray] ... | {data stats} |` line says what was read and tokenized).
"""

from __future__ import annotations

import logging
import os
from typing import IO

VERBOSE_ENV = "ORPO_RAY_VERBOSE"
PROGRESS_INTERVAL_S = 10.0  # a 400-step demo at ~8 steps/s: a dozen lines instead of ~400
_TTY_INTERVAL_S = 0.1  # tqdm's own default


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose() -> None:
    """`--verbose`: set before Ray starts, so a local Ray instance's workers inherit it (session.worker_env
    passes it on to a cluster's)."""
    os.environ[VERBOSE_ENV] = "1"


def progress_interval(stream: IO) -> float:
    """tqdm's `mininterval`: live on a terminal or with --verbose, else one line every PROGRESS_INTERVAL_S."""
    return _TTY_INTERVAL_S if verbose() or stream.isatty() else PROGRESS_INTERVAL_S


# Ray Data's per-execution INFO lines ("Starting execution of Dataset ...", "Execution plan ...", "Dataset ...
# execution finished in ...": three per dataset, a dozen datasets per run) and the "Progress bars disabled" warning.
_RAY_DATA_LOGGERS = {"ray.data._internal.execution.streaming_executor": logging.WARNING,
                     "ray.data._internal.progress": logging.ERROR}


def quiet_ray_data(ctx) -> None:
    """Ray Data's DataContext `ctx` without progress bars (they flood every worker's log) and, unless
    --verbose, without its per-dataset lines (warnings and errors still show)."""
    ctx.enable_progress_bars = False
    for name, level in _RAY_DATA_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose() else level)
