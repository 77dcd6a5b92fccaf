"""Processes that never build a model must not import model code. Ray Data's task workers import the module of
each function they run (parse_file, tokenize_batch): that module must not pull in torch or transformers' model
classes, which cost a worker process 10.1 s and 485 MB (against 1.7 s and 92 MB without them, measured on 2 cores)
before it parses a single row. The same holds, without the torch part, for the driver and Ray Train's controller.
A fresh interpreter shows what the import really loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.ray_train_helpers import ROOT

pytestmark = pytest.mark.integration

MODEL_CLASSES = ("transformers.modeling_utils", "peft", "deepspeed")
HEAVY = ("torch", *MODEL_CLASSES)                 # Ray Data's task workers: no torch at all
MODEL_CODE = (*MODEL_CLASSES, "torch._dynamo")    # the driver and the Train controller: no model code


def loaded_after(code: str, watched: tuple) -> list[str]:
    """The `watched` modules that a fresh interpreter has loaded after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["orpo_ray.data.ray_pipeline", "orpo_ray.data.tokenize", "orpo_ray.data.records"])
def test_ray_data_task_modules_do_not_import_torch(module):
    assert loaded_after(f"import {module}", HEAVY) == [], module


def test_driver_and_train_controller_do_not_import_model_code():
    """The driver of `orpo-ray train` tokenizes and starts the TorchTrainer; Ray Train's controller unpickles the
    worker function by reference (importing its module). Neither builds a model, so neither may load transformers'
    model classes, torch's compiler stack, peft or DeepSpeed: they cost ~4 s and ~200 MB per process here."""
    code = (
        "import pickle\n"
        "import ray.cloudpickle\n"
        "from orpo_ray.config import load_config\n"
        "from orpo_ray.data.ray_pipeline import tokenized_datasets\n"
        "from orpo_ray.launch.trainer import ray_train_loop, run_training\n"
        "from orpo_ray.tokenizer import load_tokenizer\n"
        "load_tokenizer(load_config('configs/demo.yaml').model)\n"
        "assert pickle.loads(ray.cloudpickle.dumps(ray_train_loop)) is ray_train_loop\n"
    )
    assert loaded_after(code, MODEL_CODE) == []


def test_driver_loading_a_model_directorys_tokenizer_does_not_import_model_classes(tmp_path):
    """A user's run loads the tokenizer of a model directory in the driver. transformers itself then loads torch's
    compiler stack (AutoConfig's type validators import transformers.activations), but still no model class, peft
    or DeepSpeed."""
    from transformers import LlamaConfig

    from orpo_ray.embedded_tokenizer import build_byte_tokenizer

    model_dir = tmp_path / "model"
    build_byte_tokenizer().save_pretrained(model_dir)
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=259).save_pretrained(model_dir)
    code = (
        "from orpo_ray.config import load_config\n"
        "from orpo_ray.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer(load_config('configs/demo.yaml', ['model.name_or_path={model_dir}']).model)\n"
        "assert tok.eos_token_id is not None\n"
    )
    assert loaded_after(code, MODEL_CLASSES) == []


def test_training_process_loads_model_code_without_scipy_and_triton():
    """A training process (a Ray Train worker, `train --local`) imports transformers' model code with scipy hidden,
    and triton too where there is no GPU (`orpo_ray.lean_imports`: 110 MB resident on the bench model's process).
    Both are importable afterwards, transformers answers again that scipy is installed, and training works: the
    rest of the suite trains in such processes."""
    script = (
        "import json, sys, torch, orpo_ray.train.loop\n"
        "import transformers.modeling_utils  # the model code is loaded\n"
        "from transformers.utils.import_utils import is_scipy_available\n"
        "hidden = [m for m in ('scipy', 'triton') if m not in sys.modules]\n"
        "expected = ['scipy'] + ([] if torch.cuda.is_available() else ['triton'])\n"
        "assert is_scipy_available()\n"
        "import scipy.optimize, triton\n"
        "print(json.dumps([hidden, expected]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    hidden, expected = json.loads(out.stdout.strip().splitlines()[-1])
    assert hidden == expected


def test_trl_bench_leg_loads_scipy_and_triton_as_trl_users_do():
    """TRL's bench leg imports transformers' model code before orpo-ray's: nothing is hidden there, so TRL's peak
    memory is what its users get."""
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback\n"
        "from orpo_ray.modeling import resolve_attn_implementation\n"
    )
    assert loaded_after(code, ("scipy", "triton")) == ["scipy", "triton"]
