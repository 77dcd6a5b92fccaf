"""`data.chat_template` travels with the exported tokenizer (output_dir/model) on both paths: in-process
(`--local`) and through Ray Train, where the driver renders the data and the worker exports. A relative file path
is given, as a user would, from the directory the run starts in (the Ray worker runs in another one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from orpo_ray.config import load_config
from orpo_ray.data.tokenize import BUILTIN_CHAT_TEMPLATES
from orpo_ray.launch.local import run_local
from orpo_ray.launch.trainer import run_training
from tests.integration.ray_train_helpers import DEMO, TINY

pytestmark = pytest.mark.integration

TEMPLATE = "{# orpo-ray export test #}" + BUILTIN_CHAT_TEMPLATES["chatml"]


@pytest.mark.parametrize("path", ["local", "ray"])
def test_exported_tokenizer_carries_the_runs_chat_template(request, tmp_path, monkeypatch, path):
    if path == "ray":
        request.getfixturevalue("_ray_local_session")
    monkeypatch.chdir(tmp_path)
    Path("my_template.jinja").write_text(TEMPLATE)
    cfg = load_config(DEMO, [*TINY, "train.max_steps=2", "data.synthetic.num_train=64",
                             "data.chat_template=my_template.jinja", f"output_dir={tmp_path / 'run'}"])
    (run_local if path == "local" else run_training)(cfg)
    exported = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert exported.chat_template == TEMPLATE
    # and it renders conversations the way the run rendered them (ChatML, not the tiny model's HH template)
    text = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
