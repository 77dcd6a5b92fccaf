"""Cluster manifests: the launcher YAML validates against Ray's own schema; the RayJob has what KubeRay needs."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from orpo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = yaml.safe_load((ROOT / "cluster/cluster-launcher.yaml").read_text())
RAYJOB = yaml.safe_load((ROOT / "cluster/rayjob.yaml").read_text())
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_validates_against_rays_schema():
    jsonschema.validate(LAUNCHER, SCHEMA)


@pytest.mark.parametrize("mutate", [
    lambda c: c.pop("provider"),
    lambda c: c.update(unknown_top_level_key=1),
    lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
])
def test_schema_rejects_a_broken_launcher(mutate):
    broken = copy.deepcopy(LAUNCHER)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_launcher_pins_torch_before_installing_the_project():
    setup = LAUNCHER["setup_commands"]
    assert setup[0] == "pip install torch==2.13.0" and "orpo-ray" in setup[1]


def _entrypoint_config(entrypoint: str) -> Path:
    match = re.match(r"orpo-ray train (\S+\.yaml)", entrypoint)
    assert match, entrypoint
    return ROOT / match.group(1)


def test_rayjob_has_kuberay_required_fields():
    assert RAYJOB["apiVersion"] == "ray.io/v1" and RAYJOB["kind"] == "RayJob"
    spec = RAYJOB["spec"]
    assert spec["entrypoint"].startswith("orpo-ray train ")
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert "torch==2.13.0" in spec["runtimeEnvYAML"]


def test_rayjob_gpus_match_the_configs_worker_count():
    spec = RAYJOB["spec"]
    cfg = load_config(_entrypoint_config(spec["entrypoint"]))
    gpus = sum(int(g["replicas"]) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert gpus == cfg.scaling.num_workers
    assert cfg.scaling.use_gpu and cfg.deepspeed.zero_stage == 2


def test_launcher_gpus_cover_the_configs_worker_count():
    cfg = load_config(ROOT / "configs/cluster/mistral7b_zero2_8gpu.yaml")
    workers = LAUNCHER["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] * workers["resources"]["GPU"] >= cfg.scaling.num_workers


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs/cluster").glob("*.yaml")))
def test_gpu_configs_use_zero2_on_gpus_from_local_dirs(name):
    cfg = load_config(ROOT / "configs/cluster" / name)
    assert cfg.scaling.use_gpu and cfg.deepspeed.zero_stage == 2 and cfg.train.precision == "bf16"
    assert cfg.model.name_or_path.startswith("/mnt/models/")
