"""The run's tokenizer: the embedded byte-level one for `model.name_or_path: tiny`, else a local directory's.

Kept apart from `modeling` on purpose: the driver of `orpo-ray train` tokenizes the data with it, and importing
`modeling` would load transformers' model classes (with torch's compiler stack behind them) into a process that
never builds a model - about 4 s and 200 MB on 2 cores. Importing this module loads neither torch nor those classes
(tests/integration/test_data_worker_imports.py).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from orpo_ray.config import ConfigError, ModelSection
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

# The files a tokenizer's `save_pretrained` writes, one or more of them (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(cfg: ModelSection) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or (None if cfg.name_or_path == "tiny" else cfg.name_or_path)
    if source is None:
        return build_byte_tokenizer()
    require_local_dir(source, "tokenizer")
    # Here, not at the top: AutoTokenizer's import chain loads torch (transformers' configuration_utils), and Ray
    # Data's task workers import this module through data/ray_pipeline.py without ever loading a directory.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        # transformers' own message for a directory without tokenizer files speaks of slow/fast conversion and
        # sentencepiece, and names neither the directory nor what to do.
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        found = [name for name in TOKENIZER_FILES if (Path(source) / name).exists()]
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        cause = (f"{', '.join(found)} found; transformers: {said}" if found
                 else f"it has none of {', '.join(TOKENIZER_FILES)}")
        raise ConfigError(
            f"{key}={source!r}: no tokenizer could be loaded from this directory ({cause}). Save the model's "
            "tokenizer there (tokenizer.save_pretrained) or set model.tokenizer to a directory that has one."
        ) from e
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
