"""The resolved plan as MLflow tags on a real store (SQLite): the runs a person filters for in the UI's search
box (``tags.`orpo.zero_stage` = '2'``) are found, the others are not."""

from __future__ import annotations

import pytest

from orpo_ray.config import load_config
from orpo_ray.plan import resolve_plan
from orpo_ray.tracking import RunTracker
from tests.unit.test_plan import SHAPE

pytestmark = pytest.mark.integration


def _logged_run(tmp_path, name, *overrides, use_deepspeed, fast_path):
    cfg = load_config(None, [f"output_dir={tmp_path / name}", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
                             "tracking.system_metrics=false", f"tracking.run_name={name}", *overrides])
    plan = resolve_plan(cfg, shape=SHAPE, trainable=10**6, total=10**6, use_deepspeed=use_deepspeed, device="cpu")
    run = RunTracker.for_worker(cfg, {}, is_main=True)
    run.log_start(cfg, {"train_pairs": 8, "eval_pairs": 2}, "bf16", plan, fast_path)
    run_id = run.run_id
    run.tracker.end("FINISHED")
    return run_id


def test_plan_tags_filter_runs_in_a_real_mlflow_store(tmp_path):
    from mlflow import MlflowClient

    zero2 = _logged_run(tmp_path, "zero2", "scaling.num_workers=2", "deepspeed.zero_stage=2", use_deepspeed=True,
                        fast_path={"chunked_lm_head": "on", "prefix_sharing": "on",
                                   "packing": "fallback: its sliding window (16 tokens) is shorter"})
    local = _logged_run(tmp_path, "local", "efficiency.chunked_lm_head=false", "efficiency.prefix_sharing=false",
                        "efficiency.packing=false", use_deepspeed=False,
                        fast_path=dict.fromkeys(("chunked_lm_head", "prefix_sharing", "packing"), "off"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [experiment] = [e.experiment_id for e in client.search_experiments() if e.name == "orpo-ray"]

    def found(query: str) -> set[str]:
        return {r.info.run_id for r in client.search_runs([experiment], filter_string=query)}

    assert found("tags.`orpo.zero_stage` = '2' and tags.`orpo.workers` = '2'") == {zero2}
    assert found("tags.`orpo.engine` = 'torch'") == {local}
    assert found("tags.`orpo.backend` = 'gloo' and tags.`orpo.precision` = 'bf16'") == {zero2, local}
    assert found("tags.`orpo.fast_path` = 'plain'") == {local}
    assert found("tags.`orpo.fast_path_fallbacks` LIKE '%packing%'") == {zero2}
    tags = client.get_run(zero2).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("orpo.")} == {
        "orpo.beta": "0.1", "orpo.objective": "orpo", "orpo.workers": "2", "orpo.device": "cpu",
        "orpo.backend": "gloo", "orpo.engine": "deepspeed", "orpo.zero_stage": "2", "orpo.precision": "bf16",
        "orpo.attention": "auto", "orpo.fast_path": "chunked_lm_head+prefix_sharing", "orpo.lm_head": "chunked",
        "orpo.fast_path_fallbacks": "packing"}
    assert client.get_run(local).data.tags["orpo.lm_head"] == "full"  # no chunked lm-head: full logits
    assert client.get_run(zero2).data.params["plan.engine"] == "DeepSpeed ZeRO-2"  # the params stay as they were
