"""The tracker seam: one factory, one protocol, a second backend in one file (tests/unit/recording_tracker.py),
and what a training run logs through it (names, params, data inputs, system metrics, the model)."""

from __future__ import annotations

import gzip

import pytest

from orpo_ray.config import ConfigError, load_config
from orpo_ray.plan import resolve_plan
from orpo_ray.tracking import BACKENDS, ExperimentTracker, RunTracker, Tracker, make_tracker
from orpo_ray.tracking.datasets import dataset_inputs, source_digest
from tests.unit.recording_tracker import RecordingTracker
from tests.unit.test_plan import SHAPE


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setitem(BACKENDS, "recording", RecordingTracker.backend)


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", *overrides])


def test_both_backends_implement_the_protocol():
    assert isinstance(Tracker.disabled(), ExperimentTracker)
    assert isinstance(RecordingTracker(), ExperimentTracker)


def test_factory_builds_the_configured_backend(tmp_path, recording):
    tracker = make_tracker(_cfg(tmp_path, "tracking.backend=recording"), uri="recording://parent")
    assert isinstance(tracker, RecordingTracker) and tracker.enabled and tracker.tracking_uri == "recording://parent"
    mlflow = make_tracker(_cfg(tmp_path))
    assert isinstance(mlflow, Tracker) and mlflow.tracking_uri == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"


def test_factory_gives_a_noop_tracker_off_rank_0_or_when_disabled(tmp_path, recording):
    cfg = _cfg(tmp_path, "tracking.backend=recording")
    assert not make_tracker(cfg, main=False).enabled
    assert not make_tracker(_cfg(tmp_path, "tracking.backend=recording", "tracking.enabled=false")).enabled
    assert not make_tracker(_cfg(tmp_path, "tracking.enabled=false")).enabled


def test_unknown_backend_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking.backend='nope'.*\['mlflow'\]"):
        make_tracker(_cfg(tmp_path, "tracking.backend=nope"))


def test_a_training_run_logs_through_the_protocol(tmp_path, recording):
    cfg = _cfg(tmp_path, "tracking.backend=recording", "orpo.beta=0.25", "train.learning_rate=0.0003")
    run = RunTracker.for_worker(cfg, {"mlflow_parent_run_id": "sweep-parent"}, is_main=True)
    rec = run.tracker
    [(_, experiment, name, tags, parent)] = rec.named("start")
    assert (experiment, name, parent) == ("orpo-ray", "run λ=0.25 lr=0.0003", "sweep-parent")
    assert tags["orpo.beta"] == 0.25
    assert rec.named("system_metrics") == [("system_metrics", 10.0)]

    run.log_start(cfg, {"train_pairs": 90, "eval_pairs": 10, "quarantined": 2}, "fp32")
    [(_, params)] = rec.named("params")
    assert params["orpo"]["beta"] == 0.25 and params["train"]["learning_rate"] == 0.0003  # flat: orpo.beta
    train, evaluation = (c[1] for c in rec.named("dataset"))
    assert (train.context, train.profile["num_rows"], train.profile["quarantined"]) == ("train", 90, 2)
    assert (evaluation.context, evaluation.profile["num_rows"]) == ("eval", 10)

    (tmp_path / "run" / "model").mkdir(parents=True)
    run.finish(cfg, [], tmp_path / "run", model=object(), tokenizer=object())
    assert rec.named("model") == [("model", "model", "model", True, False)]  # in memory: transformers flavour
    assert rec.calls[-1] == ("end", "FINISHED")


def test_lora_run_logs_its_adapter_and_merged_model(tmp_path, recording):
    cfg = _cfg(tmp_path, "tracking.backend=recording", "model.lora.enabled=true")
    for name in ("model", "merged"):
        (tmp_path / name).mkdir()
    rec = RecordingTracker()
    RunTracker(rec).finish(cfg, [], tmp_path, model=object(), tokenizer=object())
    assert rec.named("model") == [("model", "model", "model", False, True), ("model", "merged", "merged", False, False)]
    cfg = _cfg(tmp_path, "tracking.backend=recording", "tracking.log_model=false")
    rec = RecordingTracker()
    RunTracker(rec).finish(cfg, [], tmp_path)
    assert {("dir", "model", "model"), ("dir", "merged", "merged")} <= set(rec.calls) and not rec.named("model")


def test_rank_1_logs_nothing(tmp_path, recording):
    run = RunTracker.for_worker(_cfg(tmp_path, "tracking.backend=recording"), {}, is_main=False)
    run.log_start(_cfg(tmp_path), {"train_pairs": 1}, "fp32")
    run.finish(_cfg(tmp_path), [], tmp_path)
    assert run.tracker.calls == [] and run.run_id is None


def test_dataset_digest_follows_content_and_selection(tmp_path):
    data = tmp_path / "pairs.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = _cfg(tmp_path, f"data.train_path={data}")
    first = dataset_inputs(cfg, {"train_pairs": 1, "eval_pairs": 0})
    assert first[0].source == str(data) and first[0].name == "pairs.jsonl.gz-train"
    assert dataset_inputs(cfg, {"train_pairs": 1})[0].digest == first[0].digest  # same bytes, same settings
    assert first[1].digest != first[0].digest  # the eval split of the same file is another input
    limited = dataset_inputs(_cfg(tmp_path, f"data.train_path={data}", "data.max_train_pairs=5"), {})
    assert limited[0].digest != first[0].digest
    with gzip.open(data, "wt") as f:
        f.write('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    assert dataset_inputs(cfg, {})[0].digest != first[0].digest
    assert len(first[0].digest) == 16 and source_digest("hf://org/set", {}) != source_digest("hf://org/other", {})


def test_system_metrics_interval_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking.system_metrics_interval_s must be > 0, got 0"):
        _cfg(tmp_path, "tracking.system_metrics_interval_s=0")


def test_the_plan_becomes_filterable_tags_and_no_plan_sets_none(tmp_path, recording):
    cfg = _cfg(tmp_path, "tracking.backend=recording", "efficiency.packing=false", "objective=simpo",
               "train.precision=fp32")
    plan = resolve_plan(cfg, shape=SHAPE, trainable=10, total=10, use_deepspeed=False, device="cpu")
    run = RunTracker.for_worker(cfg, {}, is_main=True)
    run.log_start(cfg, {"train_pairs": 1}, "fp32", plan)  # no applied record: the plan's requested switches
    [(_, tags, _)] = run.tracker.named("tags")
    assert tags == {"orpo.objective": "simpo", "orpo.workers": "1", "orpo.device": "cpu", "orpo.backend": "gloo",
                    "orpo.engine": "torch", "orpo.zero_stage": "none", "orpo.precision": "fp32",
                    "orpo.attention": "auto", "orpo.fast_path": "chunked_lm_head+prefix_sharing+segment_attention+fused_layers",
                    "orpo.lm_head": "chunked", "orpo.fast_path_fallbacks": "none"}
    rec = RecordingTracker()
    RunTracker(rec).log_start(cfg, {"train_pairs": 1}, "fp32")
    assert not rec.named("tags")
