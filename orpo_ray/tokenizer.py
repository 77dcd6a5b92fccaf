"""The run's tokenizer: the embedded byte-level one for `model.name_or_path: tiny`, else a local directory's.

Kept apart from `modeling` on purpose: the driver of `orpo-ray train` tokenizes the data with it, and importing
`modeling` would load transformers' model classes (with torch's compiler stack behind them) into a process that
never builds a model - about 4 s and 200 MB on 2 cores. Importing this module loads neither torch nor those classes
(tests/integration/test_data_worker_imports.py).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from orpo_ray.config import ModelSection
from orpo_ray.embedded_tokenizer import build_byte_tokenizer


def load_tokenizer(cfg: ModelSection) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or (None if cfg.name_or_path == "tiny" else cfg.name_or_path)
    if source is None:
        return build_byte_tokenizer()
    require_local_dir(source, "tokenizer")
    # Here, not at the top: AutoTokenizer's import chain loads torch (transformers' configuration_utils), and Ray
    # Data's task workers import this module through data/ray_pipeline.py without ever loading a directory.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {source} has no eos_token; ORPO appends EOS to every response")
    if tok.pad_token_id is None:
        # Padding positions are masked out of every loss term, so reusing EOS as PAD is safe.
        tok.pad_token = tok.eos_token
    return tok


def require_local_dir(path: str, what: str) -> None:
    """`what` is 'tokenizer' or 'model': the config key named in the error."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.{'tokenizer' if what == 'tokenizer' else 'name_or_path'}={path!r}: no such local directory "
            "(orpo-ray loads models only from local directories or builds 'tiny'; nothing is downloaded)"
        )
