"""The plan's model-state memory is DeepSpeed's own ZeRO-2 estimator (importing deepspeed takes ~1.5 s, so this
lives with the integration tests)."""

from orpo_ray.config import load_config
from orpo_ray.plan import GB, resolve_plan
from tests.unit.test_plan import SHAPE


def test_model_states_come_from_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(None, ["scaling.num_workers=8", "deepspeed.zero_stage=2"])
    plan = resolve_plan(cfg, shape=SHAPE, trainable=10**9, total=10**9, use_deepspeed=True, device="cpu")
    _, gpu = estimate_zero2_model_states_mem_needs(10**9, num_gpus_per_node=8, cpu_offload=False)
    assert plan["memory_gb"]["model_states"] == round(gpu / GB, 3)
    assert plan["engine"] == "DeepSpeed ZeRO-2" and plan["backend"] == "gloo" and plan["workers"] == 8
