"""The whole model: padding invariance, generation with a KV cache, parameter counts of every preset."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from r1_scratch.config import apply_overrides, get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.model import (R1Model, build_on_meta, count_parameters, count_targets, generate, lm_loss_sum,
                              model_flops, sample_next)
from r1_scratch.sft import prompts_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup():
    cfg = with_data_root(get_preset("tiny"), REPO)
    torch.manual_seed(0)
    batch = next(iter(build_loader(cfg, "train", {"vqa": 0.5, "audio_qa": 0.5}, batch_size=6)))
    return cfg, R1Model(cfg.model).eval(), batch


def test_loss_sum_counts_response_tokens_only(setup):
    cfg, model, batch = setup
    out = model(batch)
    loss, n = lm_loss_sum(out.logits, batch["labels"])
    assert n == count_targets(batch) == (batch["labels"][:, 1:] != -100).sum() > 0
    # an untrained model is close to a uniform guess over the vocabulary
    assert abs(loss.item() / n.item() - math.log(cfg.model.vocab_size)) < 0.5
    assert batch["has_image"].any() and (batch["audio_lengths"] > 0).any()


def test_position_codes_start_at_the_embeddings_scale_and_learn(setup):
    cfg, model, batch = setup
    inputs = model.inputs
    codes = inputs.position_codes(torch.arange(64), 64)
    embedding_rms = inputs.token_embedding.weight.pow(2).mean().sqrt()
    assert 0.8 < (codes.pow(2).mean().sqrt() / embedding_rms).item() < 1.25  # unscaled codes are ~35x
    model.train()
    try:
        loss, n = lm_loss_sum(model(batch).logits, batch["labels"])
        (loss / n).backward()
        gain_grad = inputs.position_gain.grad.clone()
    finally:
        model.eval(); model.zero_grad(set_to_none=True)  # the module's model stays as the other tests expect it
    assert gain_grad.abs() > 0
    assert "inputs.position_gain" in dict(model.named_parameters())  # trained wherever a stage trains "inputs"


def test_generation_with_cache_equals_recomputation(setup):
    cfg, model, batch = setup
    prompts = prompts_of(batch)  # each row cut back to its question, as stage 3's evaluation asks it
    cached = generate(model, prompts, max_new_tokens=8)
    assert cached == generate(model, prompts, max_new_tokens=8, use_cache=False)
    assert len(cached) == 6 and all(len(row) == 8 for row in cached)
    # a sample alone generates what it generates in the batch
    one = {k: v[2:3] if torch.is_tensor(v) else v[2:3] for k, v in prompts.items()}
    assert generate(model, one, max_new_tokens=8) == cached[2:3]


def test_grid_positions_change_the_image_tokens_only_and_keep_the_cache_exact(setup):
    cfg, model, batch = setup
    grid_cfg = apply_overrides(cfg, ["model.image_positions=grid"])
    grid = R1Model(grid_cfg.model).eval()
    grid.load_state_dict(model.state_dict())  # no new parameters: a raster checkpoint loads
    has_image = batch["has_image"]
    assert has_image.any() and (~has_image).any()
    with torch.no_grad():
        raster_logits, grid_logits = model(batch).logits, grid(batch).logits
    # the same weights read the same text-only rows; rows with an image read their patches at other positions
    torch.testing.assert_close(grid_logits[~has_image], raster_logits[~has_image])
    assert (grid_logits[has_image] - raster_logits[has_image]).abs().max() > 1e-4
    # the codes themselves: row-major, the row in the first half of the channels, the column in the second
    image, audio = grid.encode_prefix(batch)
    seq, _ = grid.inputs(image, audio, batch["input_ids"], batch["attention_mask"])
    n = image.tokens.shape[1]; side = math.isqrt(n); half = cfg.model.d_model // 2
    codes = grid.inputs.sequence_codes(seq, n)[0, :n].view(side, side, -1)
    torch.testing.assert_close(codes[:, :1, :half].expand(-1, side, -1), codes[:, :, :half])   # row half: same along a row
    torch.testing.assert_close(codes[:1, :, half:].expand(side, -1, -1), codes[:, :, half:])   # column half: same down a column
    assert not torch.allclose(codes[0, 0], codes[0, 1]) and not torch.allclose(codes[0, 0], codes[1, 0])
    prompts = prompts_of(batch)  # each row cut back to its question, as stage 3's evaluation asks it
    assert generate(grid, prompts, max_new_tokens=6) == generate(grid, prompts, max_new_tokens=6, use_cache=False)


def test_grid_positions_need_a_width_divisible_by_4():
    from r1_scratch.config import ConfigError, ModelConfig, check_model
    with pytest.raises(ConfigError, match="image_positions"):
        check_model(ModelConfig(depth=2, d_model=130, head_dim=65, image_positions="grid"))


def test_stop_token_cuts_each_row_after_it(setup):
    cfg, model, batch = setup
    free = generate(model, batch, max_new_tokens=6)
    stop = free[0][2]  # a token the first row emits third
    stopped = generate(model, batch, max_new_tokens=6, eos_id=stop)
    for row, full in zip(stopped, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]  # the same tokens, up to and including the stop token
    assert len(stopped[0]) == free[0].index(stop) + 1 <= 3


def test_sampling_controls():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: {sample_next(logits, generator=torch.Generator().manual_seed(s), **kw).item() for s in range(200)}
    assert kept(temperature=0) == {0} and kept(top_k=2) == {0, 1} and kept(top_p=0.7) == {0, 1}
    assert kept() == {0, 1, 2, 3}


@pytest.mark.parametrize("preset, low, high", [("r1_22b", 21.5e9, 22.5e9), ("r1_175b", 170e9, 180e9)])
def test_article_sizes_on_the_meta_device(preset, low, high):
    counts = count_parameters(build_on_meta(get_preset(preset).model))
    assert low < counts["total"] < high
    assert counts["active"] < counts["total"] / 3  # top-2 of 16 experts


def test_count_matches_the_real_tiny_model(setup):
    cfg, model, batch = setup
    assert count_parameters(model)["total"] == sum(p.numel() for p in model.parameters())
    assert count_parameters(build_on_meta(cfg.model))["total"] == count_parameters(model)["total"]
    flops = model_flops(model, batch)
    assert 6 * count_parameters(model)["active"] * batch["attention_mask"].sum() * 0.1 < flops


def test_dense_first_layers_and_deepseek_kind():
    cfg = apply_overrides(get_preset("tiny"), ["model.n_dense_layers=1", "model.moe_kind=deepseek",
                                               "model.n_shared_experts=1", "model.expert_families=false",
                                               "model.router=linear", "model.n_groups=4", "model.top_groups=2"])
    model = R1Model(cfg.model)
    assert len(model.moe_layers) == 1 and model.moe_layers[0].router.score == "sigmoid"
    assert model.moe_layers[0].shared is not None


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    "Counts the ops that wait for the device: nonzero (its output size) and reading a scalar (.item(), bool())."
    def __init__(self):
        super().__init__(); self.nonzero = self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.nonzero += name == "nonzero"
        self.scalar_reads += name == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_forward_finds_the_real_tokens_once_and_lm_loss_reads_nothing(setup):
    from r1_scratch.trainer import lm_loss
    cfg, model, batch = setup
    assert len(model.moe_layers) > 1  # else once and once a layer are the same
    with DeviceReads() as forward: model(batch)
    assert forward.nonzero == 1  # shared by every MoE layer, not one wait a layer
    with DeviceReads() as loss: _, _, metrics = lm_loss(model, batch)
    assert (loss.nonzero, loss.scalar_reads) == (forward.nonzero, forward.scalar_reads)  # metrics stay tensors
    assert all(torch.is_tensor(v) for v in metrics.values())


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_the_decoder_leaves_cudnn_attention_out_and_the_encoders_keep_it(setup, monkeypatch, attention):
    "cuDNN attention plans every new shape (research/2026-12-06-sdpa-shapes): only the decoder's shapes vary."
    import r1_scratch.layers, r1_scratch.mla
    cfg, _, batch = setup
    model = R1Model(apply_overrides(cfg, [f"model.attention={attention}"]).model).eval()
    seen, sdpa = [], F.scaled_dot_product_attention
    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)
    for module in (r1_scratch.layers, r1_scratch.mla): monkeypatch.setattr(module.F, "scaled_dot_product_attention", spy)
    with torch.no_grad(): model(batch)
    decoder_calls = cfg.model.n_layers
    assert len(seen) > decoder_calls and not any(seen[-decoder_calls:]) and all(seen[:-decoder_calls])
    seen.clear()
    monkeypatch.setenv("R1_CUDNN_ATTENTION", "1")               # kept everywhere, for measuring the difference
    with torch.no_grad(): model(batch)
    assert all(seen)
