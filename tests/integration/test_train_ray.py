"""`orpo-ray train` through Ray Train (in-process driver on the session's local Ray, DeepSpeed ZeRO-2, CPU):
2 workers follow the 1-worker loss trajectory, so does `--local`, reports/checkpoints cadence, restart after a
killed worker, re-running a command resumes it, a finished run is not trained again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray.data
import torch

from orpo_ray.config import ConfigError, load_config
from orpo_ray.data.prepare import prepare_data
from orpo_ray.launch.trainer import run_training
from orpo_ray.tokenizer import load_tokenizer
from orpo_ray.train.loop import train_loop_per_worker
from tests.integration.ray_train_helpers import DEMO, TINY, ReportRecorder, losses, read_reports

pytestmark = pytest.mark.integration


def train(out: Path, cache: Path, *overrides: str, record: Path | None = None) -> dict:
    cfg = load_config(DEMO, [*TINY, f"output_dir={out}", f"data.cache_dir={cache}", *overrides])
    return run_training(cfg, callbacks=[ReportRecorder(str(record))] if record else None)


@pytest.fixture(scope="module")
def runs(_ray_local_session, tmp_path_factory):
    """Two uninterrupted runs with the same global batch of 8 pairs: 2 workers x 4 and 1 worker x 8."""
    base = tmp_path_factory.mktemp("train_ray")
    cache = base / "cache"
    start = time.perf_counter()
    two = train(base / "two", cache, "scaling.num_workers=2", "train.per_device_batch_size=4",
                "train.checkpoint_interval=2", record=base / "two_reports.jsonl")
    print(f"\n2-worker fit: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    one = train(base / "one", cache, "scaling.num_workers=1", "train.per_device_batch_size=8")
    print(f"1-worker fit: {time.perf_counter() - start:.1f} s")
    two_torch = train(base / "two_torch", cache, "scaling.num_workers=2", "train.per_device_batch_size=4",
                      "deepspeed.enabled=false")
    return {"base": base, "cache": cache, "two": two, "one": one, "two_torch": two_torch}


def history(output_dir) -> dict[int, dict]:
    return {row["step"]: row for row in json.loads((Path(output_dir) / "history.json").read_text()) if "loss" in row}


PER_PAIR = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "log_odds_ratio")


def test_two_workers_follow_the_one_worker_trajectory(runs):
    two, one = history(runs["base"] / "two"), history(runs["base"] / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    assert len({round(row["loss"], 4) for row in one.values()}) > 1  # it actually trains
    # Step 1 (same weights): every per-pair mean agrees, so global batch 1 holds the same 8 pairs.
    for key in PER_PAIR:
        assert two[1][key] == pytest.approx(one[1][key], rel=1e-5, abs=1e-6), key
    # The NLL is a token mean over the whole step (all ranks), so 2 x 4 trains like 1 x 8 up to fp32 summation
    # order, although the ranks' chosen responses differ in length (a per-rank token mean gave ~2e-4 here).
    for key in ("loss", "nll_loss"):
        torch.testing.assert_close(torch.tensor([two[s][key] for s in range(1, 7)]),
                                   torch.tensor([one[s][key] for s in range(1, 7)]), rtol=2e-5, atol=1e-6)
    assert runs["two"]["world_size"] == 2 and runs["one"]["world_size"] == 1
    assert runs["two"]["global_batch_pairs"] == runs["one"]["global_batch_pairs"] == 8
    # eval: every rank evaluates every world_size-th batch; pairs and tokens are pooled over the whole eval set.
    for key in ("eval_loss", "eval_nll_loss", "eval_rewards/accuracies"):
        assert runs["two"]["eval"][key] == pytest.approx(runs["one"]["eval"][key], rel=2e-5), key


def test_two_workers_without_deepspeed_average_their_gradients(runs):
    """deepspeed.enabled=false with 2 workers: the torch engine averages gradients over Ray Train's process group
    (before, each rank trained on its own half of the batch and rank 0 exported its own model)."""
    two_torch, one = history(runs["base"] / "two_torch"), history(runs["base"] / "one")
    assert runs["two_torch"]["plan"]["engine"].startswith("torch AdamW (deepspeed.enabled: false, gradients averaged")
    assert runs["one"]["plan"]["engine"].startswith("torch AdamW (one worker")  # deepspeed.enabled: auto
    for key in ("loss", "nll_loss"):
        torch.testing.assert_close(torch.tensor([two_torch[s][key] for s in range(1, 7)]),
                                   torch.tensor([one[s][key] for s in range(1, 7)]), rtol=2e-5, atol=1e-6)


def test_local_run_follows_the_one_worker_ray_trajectory(runs, tmp_path):
    """`orpo-ray train --local` (this process, plain torch engine) and the 1-worker Ray run (Ray Data cache,
    torch engine under deepspeed.enabled: auto) of the same config train on the same rows in the same order."""
    cfg = load_config(DEMO, [*TINY, f"output_dir={tmp_path / 'local'}", "scaling.num_workers=1",
                             "train.per_device_batch_size=8"])
    # The same data selection: the in-process rows are the Ray cache's rows, in the cache's order.
    ray_rows = ray.data.read_parquet(str(Path(runs["one"]["data"]["cache_dir"]) / "train")).take_all()
    local_rows = prepare_data(cfg, load_tokenizer(cfg.model)).train_rows
    assert [list(r["chosen_ids"]) for r in ray_rows] == [list(r["chosen_ids"]) for r in local_rows]
    assert [list(r["prompt_ids"]) for r in ray_rows] == [list(r["prompt_ids"]) for r in local_rows]

    # A Ray worker runs torch with cpus_per_worker threads; so does this run, so the comparison does not depend
    # on the machine's core count (here 2 threads gave the same bits as 1; the old per-micro-batch randperm
    # order of --local was 6.5e-3 off).
    threads = torch.get_num_threads()
    torch.set_num_threads(runs["one"]["hardware"]["threads"])
    try:
        local = train_loop_per_worker(cfg.to_dict())
    finally:
        torch.set_num_threads(threads)
    ray_run = runs["one"]
    assert local["data"]["train_pairs"] == ray_run["data"]["train_pairs"] == 256
    mine, theirs = history(tmp_path / "local"), history(runs["base"] / "one")
    assert sorted(mine) == sorted(theirs) == [1, 2, 3, 4, 5, 6]
    rel = max(abs(mine[s]["loss"] / theirs[s]["loss"] - 1) for s in mine)
    print(f"\n--local vs 1-worker Ray: max relative loss difference over 6 steps {rel:.2e} "
          f"({local['hardware']['threads']} vs {ray_run['hardware']['threads']} threads)")
    for key in ("loss", "nll_loss", "log_odds_ratio"):
        torch.testing.assert_close(torch.tensor([mine[s][key] for s in range(1, 7)], dtype=torch.float64),
                                   torch.tensor([theirs[s][key] for s in range(1, 7)], dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    assert local["eval"]["eval_loss"] == pytest.approx(ray_run["eval"]["eval_loss"], rel=1e-6)


def test_results_record_the_niceness_the_workers_trained_at(runs):
    """Ray starts its worker processes at niceness 15 (RAY_worker_niceness), below its raylet, GCS and the driver
    (0); results.json records the worker's own (README, Performance: running them at 0 was measured, no faster)."""
    assert runs["one"]["hardware"]["niceness"] == runs["two"]["hardware"]["niceness"] == 15


def test_results_record_how_long_the_trainers_threads_waited_for_a_cpu(runs):
    """results.json's cpu_wait (orpo_ray/cpu_wait.py): the Ray tax of #14 in the worker's own schedstat."""
    for name in ("one", "two"):
        wait = runs[name]["cpu_wait"]
        assert 0 <= wait["share"] < 1 and wait["run_seconds"] > 0 and wait["switches_per_second"] > 0, wait
        assert wait["wait_seconds"] == pytest.approx(wait["share"] * (wait["run_seconds"] + wait["wait_seconds"]))


def test_reports_checkpoints_and_export(runs):
    reports = read_reports(runs["base"] / "two_reports.jsonl")
    # Ray gets checkpoints and evaluations only (eval_interval=0: the final one), from both ranks; per-step
    # metrics go to history.json (log_interval=1, checked above). The final step is checkpointed (reported on its
    # own) before the final evaluation and the export.
    assert [r["steps"] for r in reports] == [[2, 2], [4, 4], [6, 6], [6, 6]]
    assert all(r["losses"][0] == r["losses"][1] for r in reports)  # all-reduced: rank 0's metrics = everyone's
    assert [r["steps"][0] for r in reports if r["checkpoint"]] == [2, 4, 6]  # checkpoint_interval=2 + the final step
    latest = Path([r["checkpoint"] for r in reports if r["checkpoint"]][-1])
    names = {p.name for p in latest.rglob("*")}
    # Every rank handed over its ZeRO-2 optimizer shard into the one checkpoint directory.
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "mp_rank_00_model_states.pt", "rng_state_rank0.json", "rng_state_rank1.json", "COMPLETE"} <= names
    assert (runs["base"] / "two" / "model" / "model.safetensors").exists()
    assert runs["two"]["resumed_from_step"] == 0 and runs["two"]["num_steps"] == 6
    # Staging dirs live next to the checkpoints (not in /tmp) and are gone once reported.
    staging = list((runs["base"] / "two" / "ray").glob("*/.checkpoint_staging"))
    assert len(staging) == 1 and list(staging[0].iterdir()) == []
    assert runs["two"]["plan"]["engine"] == "DeepSpeed ZeRO-2" and runs["two"]["plan"]["workers"] == 2


def test_killed_worker_restarts_and_matches_the_uninterrupted_run(runs):
    """Rank 0 os._exit()s after step 3 once; Ray restarts the group from the step-2 checkpoint."""
    out, record = runs["base"] / "fault", runs["base"] / "fault_reports.jsonl"
    results = train(out, runs["cache"], "scaling.num_workers=2", "train.per_device_batch_size=4",
                    "train.checkpoint_interval=2", "train.fail_at_step=3", "scaling.max_failures=1", record=record)
    marker = out / ".fault_injected_step_3"
    assert marker.exists() and results["resumed_from_step"] == 2
    resumed, clean = losses(out), losses(runs["base"] / "two")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-2 from the checkpoint, 3-6 from the restart
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(1, 7)]),
                               torch.tensor([clean[s] for s in range(1, 7)]), rtol=1e-6, atol=1e-7)
    reports = read_reports(record)
    # checkpoint 2, death at 3, restart: checkpoint 4, final checkpoint 6, final evaluation
    assert [r["steps"][0] for r in reports] == [2, 4, 6, 6]
    first_after = next(r["time"] for r in reports if r["steps"][0] == 4)
    print(f"\nresume: {first_after - marker.stat().st_mtime:.1f} s from the kill to the first checkpoint (step 4) "
          f"reported by the restarted worker group")


def test_rerun_resumes_and_a_finished_run_is_not_retrained(runs, capsys):
    """max_failures=0: the run dies at step 3; the same command again resumes from step 2 and logs every
    3 steps (window means of the uninterrupted run's losses); a third time returns the results as they are."""
    out, record = runs["base"] / "rerun", runs["base"] / "rerun_reports.jsonl"
    command = ["scaling.num_workers=1", "train.per_device_batch_size=8", "train.checkpoint_interval=2",
               "train.log_interval=3", "train.fail_at_step=3", "scaling.max_failures=0"]
    with pytest.raises(Exception):
        train(out, runs["cache"], *command, record=record)
    assert (out / ".fault_injected_step_3").exists() and not (out / "results.json").exists()
    results = train(out, runs["cache"], *command, record=record)
    assert results["resumed_from_step"] == 2
    reports = read_reports(record)
    # attempt 1: checkpoint at 2, death at 3; attempt 2: checkpoint at 4, final checkpoint + evaluation at 6.
    assert [(r["steps"][0], bool(r["checkpoint"])) for r in reports] == [(2, True), (4, True), (6, True), (6, False)]
    one, history = losses(runs["base"] / "one"), losses(out)
    assert sorted(history) == [3, 6]
    assert history[3] == pytest.approx(one[3], rel=1e-5)  # the resumed window holds step 3 only
    assert history[6] == pytest.approx((one[4] + one[5] + one[6]) / 3, rel=1e-5)

    start = time.perf_counter()
    again = train(out, runs["cache"], *command, record=record)
    assert time.perf_counter() - start < 10 and again == json.loads((out / "results.json").read_text())
    assert "already holds this finished run" in capsys.readouterr().out
    assert len(read_reports(record)) == 4  # nothing was trained
    with pytest.raises(ConfigError, match="orpo.beta"):
        train(out, runs["cache"], *command, "orpo.beta=0.5")


def test_checkpoints_go_to_a_pyarrow_storage_uri(runs):
    """scaling.storage_path as a URI (file:// here; s3:// and gs:// take the same path through pyarrow) reaches Ray
    Train untouched: checkpoints and the run state land under it, the staging dir stays local (output_dir)."""
    out, store = runs["base"] / "uri", runs["base"] / "uri_store"
    results = train(out, runs["cache"], "scaling.num_workers=1", "train.per_device_batch_size=8",
                    "train.checkpoint_interval=3", f"scaling.storage_path=file://{store}")
    (run_dir,) = [p for p in store.iterdir() if p.is_dir()]
    assert (run_dir / "orpo_run.json").exists() and json.loads((run_dir / "orpo_run.json").read_text())["completed"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*"))  # Ray Train persisted checkpoints there
    assert list((out / ".checkpoint_staging").iterdir()) == [] and not (out / "ray").exists()
    assert results["num_steps"] == 6 and (out / "model" / "model.safetensors").exists()
