"""A user's own model directory of each family trains with the default config (every efficiency switch on,
attn_implementation auto), in-process as `orpo-ray train --local` runs it: finite metrics, the fast path used
(or its fallback printed and recorded), tokenizer variants without BOS / with EOS only / without PAD, and
conversational data rendered with the directory's own chat template."""

import json
import math
import shutil

import pytest

from orpo_ray.forward.fast_path import SWITCHES
from tests.unit.test_families import NOTHING_TO_FUSE
from orpo_ray.config import load_config
from orpo_ray.train.loop import train_loop_per_worker
from orpo_ray.commands.families import FAMILIES, save_family

pytestmark = pytest.mark.integration
# Qwen-like tokenizers have no BOS; GPT-2's has EOS (<|endoftext|>) only; the rest BOS, EOS and PAD.
VARIANTS = {"qwen2": "no_bos", "qwen3": "no_bos", "qwen3_moe": "no_bos", "gpt2": "eos_only", "gpt_neox": "eos_only"}
SMALL = ["data.synthetic.num_train=24", "data.synthetic.num_eval=8", "data.max_length=64",
         "data.max_prompt_length=32", "train.per_device_batch_size=4", "train.max_steps=2", "train.log_interval=1",
         "train.eval_interval=0", "train.eval_max_batches=1", "train.precision=fp32", "train.progress_bar=false",
         "tracking.enabled=false", "export.save_model=false", "efficiency.lm_head_chunk_size=16"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_family(f, root / f, VARIANTS.get(f, "bos")) for f in FAMILIES}


def _train(tmp_path, model_dir, *extra):
    cfg = load_config(None, [*SMALL, f"model.name_or_path={model_dir}", f"output_dir={tmp_path}", *extra])
    return train_loop_per_worker(cfg.to_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_config_trains_every_family(family, family_dirs, tmp_path, capsys):
    results = _train(tmp_path, family_dirs[family])
    record, expected = dict(results["fast_path"]), dict.fromkeys(SWITCHES, "on")
    if family in NOTHING_TO_FUSE:  # no gated MLP or RMSNorm to fuse: that one switch falls back, and says so
        assert record.pop("fused_layers").startswith("fallback: no gated MLP or RMSNorm module")
        expected.pop("fused_layers")
    assert record == expected
    for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "grad_norm"):
        if key in results["train"]:
            assert math.isfinite(results["train"][key]), key
    assert math.isfinite(results["eval"]["eval_loss"])
    out = capsys.readouterr().out
    assert out.count("falls back") == (family in NOTHING_TO_FUSE), out
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["fast_path"] == results["fast_path"]


def test_a_fallback_is_printed_and_recorded(family_dirs, tmp_path, capsys):
    """Mistral with a window shorter than max_length: the packed layouts fall back, the run still trains."""
    config = json.loads((family_dirs["mistral"] / "config.json").read_text())
    config["sliding_window"] = 16
    (family_dirs["mistral"] / "config.json").write_text(json.dumps(config))
    try:
        results = _train(tmp_path, family_dirs["mistral"])
    finally:
        config["sliding_window"] = 4096
        (family_dirs["mistral"] / "config.json").write_text(json.dumps(config))
    out = capsys.readouterr().out
    assert out.count("falls back to the plain path") == 2, out
    assert "efficiency.packing falls back to the plain path for this run: its sliding window (16 tokens)" in out
    assert results["fast_path"]["chunked_lm_head"] == "on"
    assert results["fast_path"]["packing"].startswith("fallback: its sliding window (16 tokens)")
    assert math.isfinite(results["train"]["loss"])


def test_conversational_data_uses_the_directory_chat_template(family_dirs, tmp_path):
    rows = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}]}
            for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = _train(tmp_path / "run", family_dirs["qwen3"], f"data.train_path={data}", "data.eval_fraction=0.3")
    assert math.isfinite(results["train"]["loss"]) and results["data"]["quarantined"] == 0
    # A directory whose tokenizer has no template: a clear error naming it, fixed by data.chat_template.
    bare = shutil.copytree(family_dirs["qwen3"], tmp_path / "bare")
    for f in bare.glob("chat_template.*"):
        f.unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"tokenizer at {bare} has none; set data.chat_template"):
        _train(tmp_path / "bare_run", bare, f"data.train_path={data}", "data.eval_fraction=0.3")
    results = _train(tmp_path / "hh_run", bare, f"data.train_path={data}", "data.eval_fraction=0.3",
                     "data.chat_template=hh")
    assert math.isfinite(results["train"]["loss"])
