"""`orpo-ray data-report configs/hh.yaml` on the real HH-RLHF harmless-base test split (read in place from
../shared): a CLI subprocess with MLflow tracking on; its counts agree with what training would prepare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_ray.config import load_config, with_absolute_paths
from orpo_ray.data.prepare import prepare_data
from orpo_ray.embedded_tokenizer import build_byte_tokenizer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def test_hh_data_report_cli(tmp_path, monkeypatch):
    if not HH.exists():
        pytest.skip(f"{HH} not present")
    out = tmp_path / "report"
    overrides = [f"output_dir={out}", "data.max_length=512"]
    proc = subprocess.run([sys.executable, "-m", "orpo_ray.cli", "data-report", "configs/hh.yaml", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows_by_format"] == {"hh": {"pairs": 2303, "quarantined": 9}}
    assert report["pairs"]["train"] + report["pairs"]["eval"] == 2303 and report["pairs"]["eval"] > 0
    assert {k: v["count"] for k, v in report["quarantined"]["by_reason"].items()} == {
        "chosen and rejected do not share a prompt": 5, "empty chosen response": 4}
    assert "pairs: train" in proc.stdout and "padding waste at 8 pairs/batch" in proc.stdout

    # the same pipeline as training: truncation and quarantine counts match prepare_data's stats
    monkeypatch.chdir(ROOT)  # configs/hh.yaml's data path is relative to the repo root
    cfg = with_absolute_paths(load_config(ROOT / "configs/hh.yaml", [*overrides, "tracking.enabled=false"]))
    stats = prepare_data(cfg, build_byte_tokenizer()).stats
    assert stats["truncated_pairs"] == report["truncation"]["pairs_cut"]
    assert stats["quarantined_by_reason"] == {k: v["count"] for k, v in report["quarantined"]["by_reason"].items()}

    # tracking is on in configs/hh.yaml: the report and the histogram are MLflow artifacts
    logged = {p.name for p in (out / "mlartifacts").rglob("*") if p.is_file()}
    assert {"data_report.json", "data_lengths.png"} <= logged
