"""The config loader: strict, typed, documented; every file in configs/ loads."""

from pathlib import Path

import pytest

from orpo_ray.config import Config, ConfigError, config_from_dict, describe, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # round trip through a plain dict, as a Ray worker receives it
    assert config_from_dict(cfg.to_dict()) == cfg


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("orpo:\n  bata: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'orpo\.bata'"):
        load_config(p)


def test_unknown_section_rejected(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match="'trainer'"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps must be int"):
        load_config(p)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.per_device_batch_size"):
        load_config(None, ["train.per_device_batch_size=true"])


def test_literal_choices_enforced():
    with pytest.raises(ConfigError, match=r"data\.format must be one of"):
        load_config(None, ["data.format=csv"])


def test_overrides_are_typed():
    cfg = load_config(None, ["orpo.beta=0.25", "train.learning_rate=1e-5", "train.max_steps=7",
                             "data.train_path=null", "model.lora.target_modules=[q_proj]", "orpo.nll_on_prompt=true"])
    assert cfg.orpo.beta == 0.25
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 7
    assert cfg.data.train_path is None
    assert cfg.model.lora.target_modules == ["q_proj"]
    assert cfg.orpo.nll_on_prompt is True


def test_int_accepted_for_float():
    assert load_config(None, ["orpo.beta=1"]).orpo.beta == 1.0


def test_override_of_unknown_key_rejected():
    with pytest.raises(ConfigError, match="'train.max_stepz'"):
        load_config(None, ["train.max_stepz=5"])


def test_override_without_equals_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.max_steps")


def test_prompt_budget_must_leave_room_for_a_response():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["data.max_length=128", "data.max_prompt_length=128"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 40
    undocumented = [key for key, _, help_text in rows if not help_text]
    assert undocumented == []


def test_with_absolute_paths_resolves_local_paths_only(tmp_path, monkeypatch):
    from orpo_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, ["output_dir=out/run", "data.train_path=d/train.jsonl",
                                                 "data.eval_path=hf://owner/name"]))
    assert cfg.output_dir == str(tmp_path / "out" / "run")
    assert cfg.data.train_path == str(tmp_path / "d" / "train.jsonl")
    assert cfg.data.eval_path == "hf://owner/name" and cfg.model.name_or_path == "tiny"
    assert cfg.data.cache_dir is None


@pytest.mark.parametrize("setting, expected", [("templates/chat.jinja", "{tmp}/templates/chat.jinja"),
                                               ("chatml", "chatml"), ("hh", "hh"), (None, None),
                                               ("missing.jinja", "missing.jinja")])
def test_a_chat_template_file_is_made_absolute_for_the_workers(tmp_path, monkeypatch, setting, expected):
    """The Ray worker applies data.chat_template to the tokenizer it exports, from another directory; a built-in
    name, null, or a path that is no file (its error names what the user wrote) stays as given."""
    from orpo_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chat.jinja").write_text("{{ messages }}")
    cfg = with_absolute_paths(load_config(None, [f"data.chat_template={'null' if setting is None else setting}"]))
    assert cfg.data.chat_template == (expected.format(tmp=tmp_path) if expected else None)


def test_lora_config_loads_with_llama_defaults():
    lora = load_config(None, ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.1"]).model.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout) == (True, 4, 16, 0.1)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("override, key", [
    ("model.lora.r=0", r"model\.lora\.r must be >= 1"),
    ("model.lora.alpha=0", r"model\.lora\.alpha must be > 0"),
    ("model.lora.dropout=1.0", r"model\.lora\.dropout must be in \[0, 1\)"),
    ("model.lora.dropout=-0.1", r"model\.lora\.dropout must be in \[0, 1\)"),
    ("model.lora.target_modules=[]", r"model\.lora\.target_modules must be a non-empty list"),
    ("model.lora.target_modules=['']", r"model\.lora\.target_modules must be a non-empty list"),
])
def test_bad_lora_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["model.lora.enabled=true", override])


def test_merge_lora_needs_lora():
    with pytest.raises(ConfigError, match=r"export\.merge_lora=true needs model\.lora\.enabled"):
        load_config(None, ["export.merge_lora=true"])
    assert load_config(None, ["export.merge_lora=true", "model.lora.enabled=true"]).export.merge_lora
