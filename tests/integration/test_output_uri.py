"""`output_dir` as a URI (file:// here; s3:// and gs:// take the same path through pyarrow): a real `orpo-ray train`
writes to its local staging dir and its outputs arrive at the URI; checkpoints, the cache and the lock stay local."""

from __future__ import annotations

import json

import pytest

from orpo_ray.cli import main
from orpo_ray.output_staging import STAGING_ENV, staging_dir
from tests.integration.ray_train_helpers import DEMO, TINY

pytestmark = pytest.mark.integration

OUTPUTS = ["history.json", "model/config.json", "model/model.safetensors", "quarantine.jsonl", "results.json"]


def _arrived(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _train(tmp_path, monkeypatch, name: str, *flags: str):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    bucket = tmp_path / "bucket" / name
    uri = f"file://{bucket}"
    overrides = [*TINY, "train.max_steps=3", "train.checkpoint_interval=2", f"output_dir={uri}"]
    assert main(["train", DEMO, *flags, *overrides]) == 0
    return uri, bucket, staging_dir(uri)


def test_local_run_uploads_its_outputs_to_a_file_uri(tmp_path, monkeypatch, capsys):
    uri, bucket, local = _train(tmp_path, monkeypatch, "local_run", "--local")
    arrived = _arrived(bucket)
    assert set(OUTPUTS) <= set(arrived), arrived
    assert not [p for p in arrived if p.split("/")[0] in ("checkpoints", "cache", "ray", ".orpo_run.lock")]
    results = json.loads((bucket / "results.json").read_text())
    assert results["num_steps"] == 3 and results["model_dir"] == str(local / "model")
    assert (local / "checkpoints").is_dir() and not (local / ".orpo_run.lock").exists()  # resumable here, unlocked
    assert f"uploaded {len(arrived)} files from {local} to {uri}" in capsys.readouterr().out
    # `orpo-ray eval` reads the run back from the URI (downloaded into this host's staging dir for it).
    assert main(["eval", DEMO, *TINY, f"eval.checkpoint={uri}", f"output_dir={tmp_path / 'eval'}"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["checkpoint"] == str(local / "model") and evaluated["eval_pairs"] > 0


def test_ray_run_uploads_its_outputs_to_a_file_uri(_ray_local_session, tmp_path, monkeypatch):
    uri, bucket, local = _train(tmp_path, monkeypatch, "ray_run", "scaling.num_workers=1")
    arrived = _arrived(bucket)
    assert set(OUTPUTS) <= set(arrived), arrived
    assert not [p for p in arrived if p.split("/")[0] in ("checkpoints", "cache", "ray", ".orpo_run.lock")]
    assert json.loads((bucket / "results.json").read_text())["num_steps"] == 3
    assert list((local / "ray").glob("orpo-ray_run-*/checkpoint_*"))  # Ray Train's checkpoints: local staging


@pytest.mark.parametrize("driver_host, uploads", [("driver-on-another-host", True), (None, False)])
def test_rank0_on_another_host_than_the_driver_uploads_its_own_outputs(tmp_path, monkeypatch, driver_host, uploads):
    """A cluster run: rank 0's results and model land in *its* host's copy of the staging path, which the driver's
    upload never sees, so rank 0 uploads them itself; on the driver's own host it leaves that to the command."""
    import socket

    from orpo_ray.config import load_config
    from orpo_ray.launch.local import run_local
    from orpo_ray.output_staging import OUTPUT_HOST_ENV, OUTPUT_URI_ENV

    bucket = tmp_path / "bucket"
    monkeypatch.setenv(OUTPUT_URI_ENV, f"file://{bucket}")
    monkeypatch.setenv(OUTPUT_HOST_ENV, driver_host or socket.gethostname())
    run_local(load_config(DEMO, [*TINY, "train.max_steps=2", f"output_dir={tmp_path / 'rank0_host_staging'}"]))
    arrived = _arrived(bucket) if bucket.exists() else []
    assert (set(OUTPUTS) - {"quarantine.jsonl"} <= set(arrived)) is uploads, arrived
    if uploads:
        assert json.loads((bucket / "results.json").read_text())["num_steps"] == 2
