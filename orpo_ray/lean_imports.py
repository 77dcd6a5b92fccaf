"""Load transformers' model code without two packages it drags in that a training process never uses.

Why: in a process that had imported torch and transformers, `from transformers import LlamaForCausalLM` raised the
resident memory from 250 to 467 MB (torch 2.13.0, transformers 5.23.0, Intel Xeon). Of that, **triton took 74 MB**:
transformers' generation code imports torch._dynamo, which checks whether triton is installed by importing it
(a GPU kernel compiler: with no GPU it has nothing to compile for; the test extra installs it for Liger). And
**scipy took 36 MB**: transformers' object-detection loss imports `linear_sum_assignment` whenever scipy is
installed (mlflow requires scipy). Every one of those megabytes sits in each training process's peak, which the
bench's memory target (item 6 of #14: at most 0.4x TRL's peak) counts.

How: while transformers' model code (``transformers.modeling_utils``) is first imported, those packages are hidden:
``sys.modules[name] = None`` makes ``import name`` fail and ``importlib.util.find_spec(name)`` answer None, so
transformers and torch record them as not installed (both cache that answer) and go on without them. Afterwards
they are importable again: a later user of scipy in the same process (a Tune search algorithm, say) or of triton
(Liger, Triton's interpreter) still gets them. triton is hidden only where torch sees no GPU (torch.compile needs it
on one). Nothing is hidden once the model code is loaded, nor a package already imported, so a process that
loaded them first (TRL's bench leg, which runs as TRL's users run it) stays as it was.

Pure module: torch only (transformers is what it imports).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

MODEL_CODE = "transformers.modeling_utils"
NEVER_USED = ("scipy",)            # transformers' object-detection loss (Hungarian matching)
NEVER_USED_WITHOUT_GPU = ("triton",)  # torch._dynamo's check for a GPU kernel compiler


def import_hiding(module: str, hidden: Iterable[str]) -> tuple[str, ...]:
    """Import ``module`` (if not yet imported) while the packages ``hidden`` cannot be imported; returns the names
    actually hidden (none already imported, none when ``module`` already was)."""
    if module in sys.modules:
        return ()
    names = tuple(name for name in hidden if name not in sys.modules)
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's own "not importable" marker
    try:
        _forget_availability(names)
        importlib.import_module(module)
    finally:
        for name in names:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        _forget_availability(names)
    return names


def _forget_availability(names: Iterable[str]) -> None:
    """transformers caches its ``is_<package>_available()`` answers, and ``import transformers`` (a tokenizer's
    import, say) may already have asked: clear those of ``names`` so they are asked again, inside the window and
    after it."""
    checks = sys.modules.get("transformers.utils.import_utils")
    for name in names:
        check = getattr(checks, f"is_{name}_available", None)
        if hasattr(check, "cache_clear"):
            check.cache_clear()


def import_model_code() -> tuple[str, ...]:
    """Import transformers' model code the lean way (see the module docstring); returns the names it hid."""
    import torch

    hidden = NEVER_USED + (() if torch.cuda.is_available() else NEVER_USED_WITHOUT_GPU)
    return import_hiding(MODEL_CODE, hidden)
