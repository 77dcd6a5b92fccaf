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


# ------------------------------------------------------------------------------------------- hardening
NETPOL = yaml.safe_load((ROOT / "cluster/networkpolicy.yaml").read_text())
CLUSTER = RAYJOB["spec"]["rayClusterSpec"]
GROUPS = [CLUSTER["headGroupSpec"], *CLUSTER["workerGroupSpecs"]]


def test_rayjob_turns_on_token_auth_from_a_secret():
    assert CLUSTER["authOptions"] == {"mode": "token", "secretName": "orpo-ray-auth"}
    assert tuple(int(x) for x in CLUSTER["rayVersion"].split(".")) >= (2, 52, 0)  # first Ray with token auth


def test_dashboard_and_client_stay_inside_the_cluster():
    head = CLUSTER["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert RAYJOB["spec"]["submissionMode"] == "SidecarMode"  # the submitter reaches the dashboard on localhost
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and "enableIngress" not in head
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert ports == {6379}  # no dashboard (8265) or Ray client (10001) port published


def test_pods_run_as_non_root_without_privilege_escalation():
    for group in GROUPS:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_images_are_pinned_to_the_clusters_ray_version():
    for group in GROUPS:
        for container in group["template"]["spec"]["containers"]:
            image = container["image"]
            repo, _, tag = image.partition("@")[0].rpartition(":")
            assert repo == "rayproject/ray" and tag.startswith(CLUSTER["rayVersion"] + "-"), image


def test_mlflow_credentials_come_from_a_secret_on_every_pod():
    for group in GROUPS:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "orpo-mlflow"


def test_the_driver_has_bounded_retries():
    assert 0 <= RAYJOB["spec"]["backoffLimit"] <= 3 and RAYJOB["spec"]["activeDeadlineSeconds"] > 0


def test_network_policy_admits_only_the_jobs_own_pods():
    assert NETPOL["kind"] == "NetworkPolicy" and NETPOL["spec"]["policyTypes"] == ["Ingress"]
    selector = NETPOL["spec"]["podSelector"]["matchLabels"]
    for group in GROUPS:  # it selects every pod of the job ...
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
    (rule,) = NETPOL["spec"]["ingress"]  # ... and admits traffic from those pods only, on no port from elsewhere
    assert rule["from"] == [{"podSelector": {"matchLabels": selector}}] and "ports" not in rule


def test_launcher_starts_every_node_with_token_auth_and_a_local_dashboard():
    head = " ".join(LAUNCHER["head_start_ray_commands"])
    workers = " ".join(LAUNCHER["worker_start_ray_commands"])
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in commands
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    token_file = next(k for k in LAUNCHER["file_mounts"] if k.endswith("orpo_auth_token"))
    assert LAUNCHER["file_mounts"][token_file].startswith("~/")  # the token is the user's file, not the repo's
