"""Configs as a user meets them: presets, YAML files, overrides, and errors that name the field."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1_scratch.config import (PRESETS, ConfigError, apply_overrides, config_from_dict, get_preset, load_config,
                               save_config)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("items, field", [
    (["model.d_modle=256"], "model.d_modle"),            # unknown key
    (["modle.depth=2"], "modle"),                        # unknown section
    (["stages.sft.stepz=3"], "stages.sft.stepz"),        # unknown key inside a stage
    (["model.d_model=abc"], "model.d_model"),            # wrong type
    (["model.depth=true"], "model.depth"),               # bool is not an int
    (["data.mixture=[1, 2]"], "data.mixture"),           # wrong container type
    (["train.betas=[0.9]"], "train.betas"),              # wrong tuple length
    (["train.precision=fp8"], "train.precision"),        # not a choice
    (["model.n_heads=3"], "model.n_heads"),              # heads don't divide the width
    (["model.patch_size=5"], "model.patch_size"),        # patches don't tile the image
    (["model.window_size=3"], "model.window_size"),      # windows don't tile the patch grid
    (["model.top_k=17"], "model.top_k"),                 # more experts per token than experts
    (["model.n_dense_layers=9"], "model.n_dense_layers"),
    (["data.max_tokens=16"], "data.max_tokens"),         # budget below one sample
    (["stages.sft.mixture={vqa: -1}"], "stages.sft.mixture"),
    (["model.dropout=1.5"], "model.dropout"),
])
def test_each_kind_of_error_names_the_field(items, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(get_preset("tiny"), items)


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean d_model"):
        apply_overrides(get_preset("tiny"), ["model.d_modle=256"])


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(get_preset("tiny"), ["model.depth"])
    with pytest.raises(ConfigError, match="known: tiny, small, base"):
        get_preset("huge")


def test_depth_derives_sizes_unless_set_explicitly():
    cfg = apply_overrides(get_preset("tiny"), ["model.depth=4"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.model.expert_hidden) == (256, 4, 4, 704)
    cfg = apply_overrides(get_preset("tiny"), ["model.d_model=256", "model.depth=3"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (256, 4, 3)
    assert get_preset("base").model.expert_hidden % 256 == 0


def test_overrides_parse_yaml_values():
    cfg = apply_overrides(get_preset("tiny"), ["train.lr=1e-3", "data.mixture={vqa: 0.5, text: 0.5}",
                                               "data.max_tokens=null", "train.compile=true", "stages.sft.steps=20"])
    assert cfg.train.lr == 1e-3 and cfg.data.mixture == {"vqa": 0.5, "text": 0.5}
    assert cfg.data.max_tokens is None and cfg.train.compile is True and cfg.stages["sft"].steps == 20
    assert cfg.stages["pretrain"].steps is None  # untouched stages keep their defaults


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip(tmp_path, name):
    save_config(get_preset(name), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == get_preset(name)


@pytest.mark.parametrize("name", list(PRESETS))
def test_committed_configs_equal_the_presets(name):
    assert load_config(REPO / "configs" / f"{name}.yaml") == get_preset(name)


def test_partial_yaml_merges_over_its_preset(tmp_path):
    (tmp_path / "mine.yaml").write_text("preset: small\ntrain:\n  lr: 1.0e-4\nstages:\n  sft:\n    steps: 7\n")
    cfg = load_config(tmp_path / "mine.yaml", ["model.depth=8"])
    assert (cfg.preset, cfg.train.lr, cfg.model.d_model, cfg.model.image_size) == ("small", 1e-4, 512, 64)
    assert cfg.stages["sft"].steps == 7 and cfg.stages["sft"].max_tokens == get_preset("small").stages["sft"].max_tokens
    (tmp_path / "bad.yaml").write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*model.n_layer"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_resolved_yaml_and_names_bad_fields():
    run = lambda *a: subprocess.run([sys.executable, "-m", "r1_scratch.config", *a], capture_output=True, text=True,
                                    cwd=REPO, timeout=120)
    out = run("--preset", "tiny", "model.depth=3")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["d_model"] == 192
    bad = run("--preset", "tiny", "model.n_heads=5")
    assert bad.returncode != 0 and "model.n_heads" in bad.stderr
