"""Configs as a user meets them: presets, YAML files, overrides, the CLI, and errors that name the field."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1_scratch.config import (PRESETS, STAGE_OPTIONS, AlignOptions, Config, GRPOOptions, ConfigError, ModelConfig,
                               PretrainOptions, SFTOptions, StageConfig, apply_overrides, config_from_dict,
                               config_to_dict, default_stages, get_preset, load_config, save_config)

REPO = Path(__file__).resolve().parents[1]


def error_of(*items, preset="tiny") -> str:
    "The ConfigError message that overriding `preset` with `items` raises."
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset(preset), list(items))
    return str(info.value)


# --- each kind of error names the field -------------------------------------------------------------------------

@pytest.mark.parametrize("item, message", [
    ("model.d_modle=256", "unknown key model.d_modle; did you mean model.d_model?"),
    ("modle.depth=2", "unknown key modle; did you mean model?"),
    ("train.wandbb=online", "unknown key train.wandbb; did you mean train.wandb?"),
    ("data.mixtures={vqa: 1}", "unknown key data.mixtures; did you mean data.mixture?"),
    ("stages.sft.stepz=3", "unknown key stages.sft.stepz; did you mean stages.sft.steps?"),
    ("stages.sfft.steps=3", "unknown key stages.sfft; did you mean stages.sft?"),
    ("stages.sft.options.expert_dropot=0.3", "unknown key stages.sft.options.expert_dropot; did you mean "
                                             "stages.sft.options.expert_dropout?"),
    ("stages.align.options={temprature: 0.2}", "did you mean stages.align.options.temperature or"),
    ("stages.pretrain.options.expert_dropout=0.3", "unknown key stages.pretrain.options.expert_dropout; known in "
                                                   "stages.pretrain.options: masking,"),
    ("model.zzz=1", "unknown key model.zzz; known in model: depth, d_model,"),
])
def test_unknown_keys_are_named_with_suggestions(item, message):
    assert message in error_of(item)


@pytest.mark.parametrize("item, message", [
    ("model.d_model=abc", "model.d_model: expected int or None, got str 'abc'"),
    ("model.depth=true", "model.depth: expected int, got bool True"),          # bool is not an int
    ("model.depth=2.5", "model.depth: expected int, got float 2.5"),
    ("model.tie_embeddings=1", "model.tie_embeddings: expected bool, got int 1"),  # nor an int a bool
    ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
    ("train.lr=true", "train.lr: expected float, got bool True"),
    ("data.mixture=[1, 2]", "data.mixture: expected dict[str, float], got list [1, 2]"),
    ("data.mixture={vqa: high}", "data.mixture: expected dict[str, float]"),
    ("train.betas=[0.9]", "train.betas: expected tuple[float, float], got list [0.9]"),
    ("stages.sft.trainable=decoder", "stages.sft.trainable: expected list[str], got str 'decoder'"),
    ("stages.sft.steps=ten", "stages.sft.steps: expected int or None, got str 'ten'"),
    ("stages.sft.options.answer_samples=many", "stages.sft.options.answer_samples: expected int, got str 'many'"),
    ("stages.align.options.hard_negatives=1", "stages.align.options.hard_negatives: expected bool, got int 1"),
    ("stages.align.options.swap_words=[circle, square]", "stages.align.options.swap_words: expected list[list[str]]"),
    ("stages.sft.options=3", "stages.sft.options: expected a mapping, got int 3"),
])
def test_wrong_types_are_named(item, message):
    assert message in error_of(item)


@pytest.mark.parametrize("item, message", [
    ("train.precision=fp8", "train.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
    ("train.wandb=cloud", "train.wandb: expected one of 'offline', 'online', 'disabled', got 'cloud'"),
    ("model.moe_kind=switch", "model.moe_kind: expected one of 'article', 'deepseek', got 'switch'"),
    ("model.router=deep", "model.router: expected one of 'mlp', 'linear', got 'deep'"),
    ("model.position_bias=rope", "model.position_bias: expected one of 't5', 'alibi', 'learned', got 'rope'"),
    ("stages.sft.options.loss_average=tokens", "stages.sft.options.loss_average: expected one of 'answer', 'token'"),
    ("stages.pretrain.options.weighting=equal", "stages.pretrain.options.weighting: expected one of 'uncertainty', "
                                                "'sum', got 'equal'"),
])
def test_bad_choices_are_named(item, message):
    assert message in error_of(item)


@pytest.mark.parametrize("items, message", [
    (["model.n_heads=3"], "model.n_heads=3 does not divide model.d_model=128"),
    (["model.n_heads=4"], "model.n_heads=4 x model.head_dim=64 = 256 but model.d_model=128: set model.head_dim=32"),
    (["model.d_model=100"], "model.n_heads=1 x model.head_dim=64 = 64 but model.d_model=100"),
    (["model.patch_size=5"], "model.patch_size=5 does not divide model.image_size=32"),
    (["model.window_size=5"], "model.window_size=5 is larger than the 4x4 patch grid"),
    (["model.top_k=17"], "model.top_k=17 exceeds model.n_experts=16"),
    (["model.n_dense_layers=3"], "model.n_dense_layers=3 exceeds model.n_layers=2"),
    (["model.hop_length=800"], "model.hop_length=800 exceeds model.n_fft=400"),
    (["model.depth=0"], "model.depth must be positive, got 0"),
    (["model.n_experts=0"], "model.n_experts must be positive, got 0"),
    (["model.n_shared_experts=-1"], "model.n_shared_experts must be >= 0, got -1"),
    (["data.batch_size=0"], "data.batch_size must be positive, got 0"),
    (["train.grad_accum=0"], "train.grad_accum must be positive, got 0"),
    (["train.lr=0"], "train.lr must be positive, got 0"),
    (["stages.sft.steps=0"], "stages.sft.steps must be positive, got 0"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
    (["model.expert_dropout=-0.1"], "model.expert_dropout must be in [0, 1)"),
    (["data.mixture={vqa: -1, text: 2}"], "data.mixture.vqa=-1: mixture weights must be >= 0"),
    (["data.mixture={vqa: 0}"], "data.mixture: mixture weights must sum to > 0"),
    (["data.mixture={}"], "data.mixture: mixture weights must sum to > 0"),
    (["stages.sft.mixture={vqa: 0}"], "stages.sft.mixture: mixture weights must sum to > 0"),
    (["data.max_tokens=64"], "data.max_tokens=64 is below data.max_text_tokens=128"),
    (["stages.sft.max_tokens=64"], "stages.sft.max_tokens=64 is below data.max_text_tokens=128"),
    (["data.max_text_tokens=512"], "data.max_text_tokens=512 exceeds model.max_seq_len=256"),
])
def test_inconsistent_sizes_are_named(items, message):
    assert message in error_of(*items)


def test_empty_stage_mixture_means_the_data_mixture_and_is_allowed():
    assert apply_overrides(get_preset("tiny"), ["stages.sft.mixture={}"]).stages["sft"].mixture == {}


@pytest.mark.parametrize("item, message", [
    ("model.depth", "override 'model.depth' is not of the form section.key=value"),
    ("depth=3", "override 'depth=3' is not of the form section.key=value"),
    ("model..depth=3", "is not of the form section.key=value"),
    ("model.depth.x=1", "depth is a value, not a section"),
])
def test_malformed_overrides(item, message):
    assert message in error_of(item)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; known: tiny, small, base"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        config_from_dict({"preset": "huge"})


def test_direct_construction_and_mutation_are_checked():
    with pytest.raises(ConfigError, match="model.depth: expected int, got bool True"):
        ModelConfig(depth=True)
    with pytest.raises(ConfigError, match=r"model\.window_size=5"):
        dataclasses.replace(ModelConfig(), window_size=5)
    cfg = get_preset("tiny")
    cfg.model.n_heads = 3
    with pytest.raises(ConfigError, match="model.n_heads=3 does not divide"):
        Config(cfg.model, cfg.data, cfg.train, cfg.stages)


def test_stage_options_are_typed_per_stage():
    tiny = get_preset("tiny")
    assert [type(st.options) for st in tiny.stages.values()] == [PretrainOptions, AlignOptions, SFTOptions, GRPOOptions]
    assert list(STAGE_OPTIONS) == list(tiny.stages)
    with pytest.raises(ConfigError, match="stages.sft.options: expected SFTOptions, got AlignOptions"):
        Config(stages={**default_stages(), "sft": StageConfig(options=AlignOptions())})
    with pytest.raises(ConfigError, match=r"stages.sft.options.expert_dropout=1.5 is out of range"):
        apply_overrides(tiny, ["stages.sft.options.expert_dropout=1.5"])
    with pytest.raises(ConfigError, match="stages.align.options.temperature must be positive"):
        apply_overrides(tiny, ["stages.align.options.temperature=0"])
    cfg = apply_overrides(tiny, ["stages.sft.options={eval_batches: 2}"])  # a mapping merges key by key
    assert cfg.stages["sft"].options == SFTOptions(expert_dropout=0.3, eval_batches=2)
    assert StageConfig().options is None and Config(stages={"sft": StageConfig()}).stages["sft"].options == SFTOptions()


# --- derivation from depth ----------------------------------------------------------------------------------------

def test_presets_have_the_documented_sizes():
    sizes = {n: get_preset(n).model for n in ("tiny", "small", "base")}
    assert [(m.depth, m.d_model, m.n_heads, m.n_layers, m.expert_hidden) for m in sizes.values()] == [
        (2, 128, 2, 2, 384), (6, 384, 6, 6, 1024), (12, 768, 12, 12, 2048)]
    assert [(m.image_size, m.patch_size, m.window_size, m.n_mels, m.max_seq_len) for m in sizes.values()] == [
        (32, 8, 4, 40, 256), (64, 8, 4, 64, 512), (224, 16, 7, 80, 2048)]
    assert [m.n_patches for m in sizes.values()] == [16, 64, 196]
    assert sizes["tiny"].audio_frames_per_second == 25.0
    assert [get_preset(n).train.precision for n in ("tiny", "small", "base")] == ["auto", "bf16", "bf16"]
    assert get_preset("base").model.ffn_multiple_of == 256 and get_preset("base").model.expert_hidden % 256 == 0


def test_depth_override_rederives_every_size():
    m = apply_overrides(get_preset("tiny"), ["model.depth=4"]).model
    assert (m.d_model, m.n_heads, m.n_layers, m.expert_hidden) == (256, 4, 4, 704)
    assert (m.text_layers, m.vision_layers, m.audio_layers) == (4, 4, 4)
    m = apply_overrides(get_preset("small"), ["model.depth=8"]).model
    assert (m.d_model, m.n_heads, m.expert_hidden, m.image_size) == (512, 8, 1408, 64)


def test_explicit_width_stays_while_depth_changes():
    cfg = apply_overrides(get_preset("tiny"), ["model.d_model=256", "model.depth=3"])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.model.expert_hidden) == (256, 4, 3, 704)
    again = apply_overrides(cfg, ["model.depth=5"])  # set in an earlier call: still kept
    assert (again.model.d_model, again.model.n_layers, again.model.n_heads) == (256, 5, 4)
    layers = apply_overrides(get_preset("tiny"), ["model.vision_layers=1", "model.depth=3"]).model
    assert (layers.vision_layers, layers.text_layers) == (1, 3)


def test_head_dim_and_ffn_multiple_rederive_their_fields():
    m = apply_overrides(get_preset("tiny"), ["model.head_dim=32", "model.ffn_multiple_of=256"]).model
    assert (m.n_heads, m.head_dim, m.expert_hidden) == (4, 32, 512)


# --- overrides ----------------------------------------------------------------------------------------------------

def test_overrides_parse_yaml_values():
    cfg = apply_overrides(get_preset("tiny"), [
        "train.lr=1e-3", "data.mixture={vqa: 0.5, text: 0.5}", "data.max_tokens=null", "train.compile=true",
        "stages.sft.steps=20", "train.betas=[0.8, 0.9]", "stages.align.options.temperature=0.07",
        "stages.pretrain.trainable=[text, vision]", "train.run_name=my run"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.data.mixture == {"vqa": 0.5, "text": 0.5} and cfg.data.max_tokens is None
    assert cfg.train.compile is True and cfg.train.betas == (0.8, 0.9) and cfg.train.run_name == "my run"
    assert cfg.stages["sft"].steps == 20 and cfg.stages["pretrain"].trainable == ["text", "vision"]
    before = get_preset("tiny").stages["align"].options
    assert cfg.stages["align"].options == dataclasses.replace(before, temperature=0.07)  # one key changed
    assert cfg.stages["pretrain"].steps == get_preset("tiny").stages["pretrain"].steps == 100  # untouched: the preset's


def test_int_for_float_becomes_float_and_original_is_untouched():
    tiny = get_preset("tiny")
    cfg = apply_overrides(tiny, ["train.lr=1", "model.depth=3"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert (tiny.train.lr, tiny.model.d_model) == (3e-4, 128)


# --- dicts and YAML -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_dict_round_trip(name):
    d = config_to_dict(get_preset(name))
    assert d["preset"] == name and d["train"]["betas"] == [0.9, 0.95] and d["model"]["d_model"] > 0
    assert config_from_dict(d) == get_preset(name)


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip(tmp_path, name):
    save_config(get_preset(name), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == get_preset(name)
    assert os.listdir(tmp_path) == ["c.yaml"]  # the temporary file was renamed, nothing left behind
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert saved["model"]["expert_hidden"] == get_preset(name).model.expert_hidden  # derived values are written


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    save_config(get_preset("tiny"), path)
    before = path.read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_config(get_preset("small"), path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["c.yaml"]


@pytest.mark.parametrize("name", ["tiny", "small", "base", "r1_22b", "r1_175b"])
def test_committed_configs_equal_the_presets(name, tmp_path):
    path = REPO / "configs" / f"{name}.yaml"
    header = f"# generated by: python -m r1_scratch.config --preset {name} --out configs/{name}.yaml\n"
    assert path.read_text().startswith(header)
    assert load_config(path) == get_preset(name)
    save_config(get_preset(name), tmp_path / "fresh.yaml", header)  # every field written out, new ones too
    assert path.read_text() == (tmp_path / "fresh.yaml").read_text(), f"regenerate it: {header[16:].strip()}"


def test_partial_yaml_merges_over_its_preset(tmp_path):
    (tmp_path / "mine.yaml").write_text("preset: small\ntrain:\n  lr: 1e-4\nstages:\n  sft:\n    steps: 7\n")
    cfg = load_config(tmp_path / "mine.yaml", ["model.depth=8"])
    assert (cfg.preset, cfg.train.lr, cfg.model.d_model, cfg.model.image_size) == ("small", 1e-4, 512, 64)
    assert cfg.stages["sft"].steps == 7 and cfg.stages["sft"].max_tokens == get_preset("small").stages["sft"].max_tokens == 32768
    (tmp_path / "plain.yaml").write_text("model:\n  depth: 3\n")  # no preset: tiny
    cfg = load_config(tmp_path / "plain.yaml")
    assert (cfg.preset, cfg.model.d_model, cfg.model.image_size) == ("tiny", 192, 32)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == get_preset("tiny")


def test_bad_yaml_files_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key model\.n_layer; did you mean model\.n_layers"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "stage.yaml").write_text("stages:\n  sft:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key stages\.sft\.lrr; did you mean stages\.sft\.lr\?"):
        load_config(tmp_path / "stage.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: config: expected a mapping, got list"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "section.yaml").write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping, got int 3"):
        load_config(tmp_path / "section.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


# --- the command line ---------------------------------------------------------------------------------------------

def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "r1_scratch.config", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_prints_resolved_yaml():
    out = cli("--preset", "tiny", "model.depth=3")
    assert out.returncode == 0, out.stderr
    d = yaml.safe_load(out.stdout)
    assert (d["model"]["d_model"], d["model"]["n_heads"], d["model"]["expert_hidden"], d["preset"]) == (192, 3, 512, "tiny")
    assert "d_model: 192" in out.stdout


def test_cli_writes_a_file_that_loads_back(tmp_path):
    out = cli("--preset", "small", "--out", str(tmp_path / "s.yaml"), "train.lr=1e-4")
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "s.yaml").read_text()
    assert text.splitlines()[0] == f"# generated by: python -m r1_scratch.config --preset small --out {tmp_path / 's.yaml'} train.lr=1e-4"
    cfg = load_config(tmp_path / "s.yaml")
    assert (cfg.preset, cfg.train.lr, cfg.model.d_model) == ("small", 1e-4, 384)
    again = cli("--config", str(tmp_path / "s.yaml"), "model.depth=4")
    assert again.returncode == 0 and yaml.safe_load(again.stdout)["model"]["d_model"] == 256


@pytest.mark.parametrize("args, field", [
    (["--preset", "tiny", "model.n_heads=5"], "model.n_heads"),
    (["--preset", "tiny", "model.d_modle=5"], "model.d_modle"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_bad_config_exits_nonzero_naming_the_field(args, field):
    bad = cli(*args)
    assert bad.returncode == 2 and field in bad.stderr and bad.stdout == ""
    assert "Traceback" not in bad.stderr
