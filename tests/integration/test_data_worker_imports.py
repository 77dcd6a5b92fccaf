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

HEAVY = ("torch", "transformers.modeling_utils", "peft", "deepspeed")


@pytest.mark.parametrize("module", ["orpo_ray.data.ray_pipeline", "orpo_ray.data.tokenize", "orpo_ray.data.records"])
def test_ray_data_task_modules_do_not_import_torch(module):
    code = f"import json, sys, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], (module, out.stdout)


MODEL_CODE = ("transformers.modeling_utils", "torch._dynamo", "peft", "deepspeed")


def test_driver_and_train_controller_do_not_import_model_code():
    """The driver of `orpo-ray train` tokenizes and starts the TorchTrainer; Ray Train's controller unpickles the
    worker function by reference (importing its module). Neither builds a model, so neither may load transformers'
    model classes, torch's compiler stack, peft or DeepSpeed: they cost ~4 s and ~200 MB per process here."""
    code = (
        "import json, pickle, sys\n"
        "from orpo_ray.launch.trainer import run_training, ray_train_loop\n"
        "from orpo_ray.data.ray_pipeline import tokenized_datasets\n"
        "from orpo_ray.tokenizer import load_tokenizer\n"
        "from orpo_ray.config import load_config\n"
        "load_tokenizer(load_config('configs/demo.yaml').model)\n"
        "import ray.cloudpickle\n"
        "assert pickle.loads(ray.cloudpickle.dumps(ray_train_loop)) is ray_train_loop\n"
        f"print(json.dumps([m for m in {MODEL_CODE!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], out.stdout
