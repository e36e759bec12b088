"Compressed checkpoints as a user meets them: saved and loaded without pickle, the same outputs, clear errors."
import pickle
from pathlib import Path

import pytest
import torch

from r1_scratch.compress import (compress, experts_to_keep, load_compressed, moe_layers, prune_experts,
                                 save_compressed, weight_bytes)
from r1_scratch.config import get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.model import R1Model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    return with_data_root(get_preset("tiny"), ROOT)


@pytest.fixture(scope="module")
def batch(cfg):
    return next(iter(build_loader(cfg, "val", {"vqa": 0.5, "audio_qa": 0.5}, batch_size=4, num_workers=0)))


def fresh(cfg) -> R1Model:
    torch.manual_seed(0)
    return R1Model(cfg.model).eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad(): return model(batch).logits.float()


def no_pickle(monkeypatch):
    "Make any unpickling fail loudly: loading a compressed checkpoint must never execute pickled code."
    def refuse(*args, **kwargs): raise AssertionError("pickle was used")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("recipe", ["bf16", "int8_weight", "int8_dynamic"])
def test_saved_and_loaded_model_gives_the_same_outputs(cfg, batch, recipe, tmp_path, monkeypatch):
    model = compress(fresh(cfg), recipe)
    before = logits(model, batch)
    path = save_compressed(model, tmp_path / recipe, cfg, recipe)
    assert sorted(p.name for p in path.iterdir()) == ["compressed.json", "model.safetensors"]
    no_pickle(monkeypatch)
    loaded, loaded_cfg = load_compressed(path)
    assert loaded_cfg.model == cfg.model
    torch.testing.assert_close(logits(loaded, batch), before, rtol=0, atol=0)


def test_int8_is_a_third_of_fp32_on_disk(cfg, tmp_path):
    fp32 = save_compressed(fresh(cfg), tmp_path / "fp32", cfg, "fp32")
    int8 = save_compressed(compress(fresh(cfg), "int8_weight"), tmp_path / "int8", cfg, "int8_weight")
    share = (int8 / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    assert 0.2 < share < 0.35, share  # int8 weights + fp32 scales and the few fp32 tensors (norms, router)


def test_a_pruned_and_quantised_model_round_trips(cfg, batch, tmp_path, monkeypatch):
    model = fresh(cfg)
    load = torch.arange(16.0).repeat(len(moe_layers(model)), 3, 1)  # experts 4..15 the busiest
    keep = experts_to_keep(load, 12)
    assert all(sorted(k) == list(range(4, 16)) for k in keep)
    model = compress(prune_experts(model, keep), "int8_weight")
    assert all(layer.experts.n_experts == 12 for layer in moe_layers(model))
    before = logits(model, batch)
    path = save_compressed(model, tmp_path / "pruned", cfg, "int8_weight", keep)
    no_pickle(monkeypatch)
    loaded, _ = load_compressed(path)
    assert all(layer.experts.n_experts == 12 for layer in moe_layers(loaded))
    assert weight_bytes(loaded) == weight_bytes(model)
    torch.testing.assert_close(logits(loaded, batch), before, rtol=0, atol=0)


def test_saving_again_replaces_the_checkpoint_whole(cfg, batch, tmp_path):
    path = save_compressed(fresh(cfg), tmp_path / "m", cfg, "fp32")
    save_compressed(compress(fresh(cfg), "int8_weight"), path, cfg, "int8_weight")
    save_compressed(compress(fresh(cfg), "bf16"), path, cfg, "bf16")  # a third save over the same place
    loaded, _ = load_compressed(path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written or stale left behind


def test_bad_input_is_named(cfg, tmp_path):
    with pytest.raises(ValueError, match="recipe must be one of"):
        compress(fresh(cfg), "int3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="compressed.json"):
        load_compressed(tmp_path / "empty")
    with pytest.raises(ValueError, match="at least top_k"):
        prune_experts(fresh(cfg), [[0]] * len(moe_layers(fresh(cfg))))
