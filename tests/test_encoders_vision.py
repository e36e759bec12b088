"""The vision encoder as a user meets it: windows equal masked full attention, odd sizes, missing images."""
import dataclasses

import pytest
import torch

from r1_scratch.config import get_preset
from r1_scratch.layers import MultiHeadAttention
from r1_scratch.vision import (PatchEmbed, VisionBlock, VisionEncoder, apply_in_windows, block_kinds, partition_mask,
                               sincos_2d, window_labels, window_mask, window_partition, window_unpartition)


@pytest.fixture
def mcfg():
    return get_preset("tiny").model


@pytest.mark.parametrize("h,w", [(8, 8), (5, 7), (3, 2), (12, 9)])
@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_masked_full_attention(h, w, shift):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4)
    x = torch.randn(2, h, w, 32, requires_grad=True)
    probe = torch.randn(2, h, w, 32)
    fast = apply_in_windows(attn, x, 4, shift)
    full = attn(x.flatten(1, 2), attn_mask=window_mask(h, w, 4, shift)).view_as(x)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    g_fast = torch.autograd.grad((fast * probe).sum(), [x, *attn.parameters()])
    g_full = torch.autograd.grad((full * probe).sum(), [x, *attn.parameters()])
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_mask_matters():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4)
    x = torch.randn(1, 8, 8, 32)
    shifted = apply_in_windows(attn, x, 4, 2)
    assert (shifted - apply_in_windows(attn, x, 4, 0)).abs().max() > 0.1
    assert (shifted - attn(x.flatten(1, 2)).view_as(x)).abs().max() > 0.1


def test_whole_block_in_windows_equals_masked_block():
    torch.manual_seed(0)
    block = VisionBlock(32, 4, 64, window=4, shift=2)
    x = torch.randn(2, 5, 7, 32)
    expected = block.block(x.flatten(1, 2), attn_mask=window_mask(5, 7, 4, 2)).view_as(x)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_partition_round_trip_and_order():
    x = torch.randn(3, 8, 12, 5)
    wins = window_partition(x, 4)
    assert wins.shape == (3 * 2 * 3, 16, 5)
    torch.testing.assert_close(wins[4], x[0, 4:8, 4:8].reshape(16, 5))  # image 0, window row 1, column 1
    torch.testing.assert_close(window_unpartition(wins, 4, 8, 12), x)


def test_window_labels_and_masks():
    assert window_labels(4, 4, 4, shift=2).unique().numel() == 1  # one window covers the grid: no shift
    assert window_labels(8, 8, 4).unique().numel() == 4
    assert window_labels(8, 8, 4, shift=2).unique().numel() == 9  # 2×2 windows shifted -> 3×3 cut regions
    m = window_mask(5, 7, 4)
    assert m.shape == (35, 35) and torch.equal(m, m.T) and m.diagonal().all()
    assert partition_mask(8, 8, 4) is None  # nothing padded, nothing shifted: SDPA runs unmasked
    pm = partition_mask(5, 7, 4, 2)
    assert pm.shape == (4, 16, 16) and pm.any(-1).all()  # every query, padded ones too, sees at least itself


def test_patch_embed_sizes():
    embed = PatchEmbed(3, 16, 8)
    tokens, grid = embed(torch.rand(2, 3, 40, 56))
    assert tokens.shape == (2, 35, 16) and grid == (5, 7)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        embed(torch.rand(1, 3, 30, 32))


def test_positions_do_not_depend_on_grid_size():
    torch.testing.assert_close(sincos_2d(4, 4, 64)[:3, :3], sincos_2d(40, 24, 64)[:3, :3])
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(4, 4, 30)


@pytest.mark.parametrize("H,W", [(40, 56), (32, 32), (8, 8), (64, 24)])
def test_encoder_any_patchable_size(mcfg, H, W):
    torch.manual_seed(0)
    enc = VisionEncoder(mcfg).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 3, H, W))
    n = (H // 8) * (W // 8)
    assert out.tokens.shape == (2, n, mcfg.d_model) and out.mask.shape == (2, n) and out.mask.all()
    assert out.pooled.shape == (2, mcfg.d_model) and out.tokens.isfinite().all()
    torch.testing.assert_close(out.pooled, out.tokens.amax(1))  # the presets pool images by the max


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_image_pool_chooses_the_pooled_vector_and_a_missing_image_pools_to_zero(mcfg, pool):
    torch.manual_seed(0)
    enc = VisionEncoder(dataclasses.replace(mcfg, image_pool=pool)).eval()
    with torch.no_grad():
        out = enc(torch.rand(3, 3, 32, 32), has_image=torch.tensor([True, False, True]))
    expected = out.tokens.mean(1) if pool == "mean" else out.tokens.amax(1)
    torch.testing.assert_close(out.pooled[[0, 2]], expected[[0, 2]])
    assert out.pooled[1].abs().max() == 0


def test_odd_size_with_windows_and_shift_at_small_patch(mcfg):
    "40×56 at patch 4 is a 10×14 grid: padded to 12×16 windows of 4, and the shift is active."
    torch.manual_seed(0)
    enc = VisionEncoder(dataclasses.replace(mcfg, patch_size=4, vision_layers=2)).eval()
    assert [b.shift for b in enc.blocks] == [0, 2]
    with torch.no_grad():
        out = enc(torch.rand(1, 3, 40, 56))
    assert out.tokens.shape == (1, 140, mcfg.d_model) and out.tokens.isfinite().all()


def test_missing_images_are_masked_and_do_not_leak(mcfg):
    torch.manual_seed(0)
    enc = VisionEncoder(mcfg).eval()
    images = torch.rand(3, 3, 40, 56)
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        out = enc(images, has)
        alone = enc(images[[0, 2]])
    assert out.mask.sum(1).tolist() == [35, 0, 35]
    assert out.tokens[1].abs().sum() == 0 and out.pooled[1].abs().sum() == 0
    torch.testing.assert_close(out.tokens[[0, 2]], alone.tokens, atol=1e-5, rtol=1e-5)


def test_fixed_windows_never_see_outside_their_window(mcfg):
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64, requires_grad=True)  # 8×8 grid, 2×2 windows of 4
    enc = VisionEncoder(dataclasses.replace(mcfg, vision_layers=3), shift=False)
    enc(images).tokens[0, 0].sum().backward()
    per_patch = images.grad.abs().sum(1)[0].view(8, 8, 8, 8).sum((1, 3))
    assert (per_patch[:4, :4] > 0).all() and (per_patch[4:] == 0).all() and (per_patch[:, 4:] == 0).all()
    images.grad = None
    enc = VisionEncoder(dataclasses.replace(mcfg, vision_layers=2), shift=True)
    enc(images).tokens[0, 3 * 8 + 3].sum().backward()  # patch (3, 3): its shifted window straddles all four
    assert (images.grad.abs().sum(1)[0].view(8, 8, 8, 8).sum((1, 3)) > 0).all()


def test_block_kinds():
    assert block_kinds(4, 4) == [(4, 0), (4, 2), (4, 0), (4, 2)]
    assert block_kinds(3, 7, shift=False, global_every=3) == [(7, 0), (7, 0), (0, 0)]


def test_presets_build_on_meta():
    for preset in ("small", "base"):
        with torch.device("meta"):
            enc = VisionEncoder(get_preset(preset).model)
        assert sum(p.numel() for p in enc.parameters()) > 1e6


def test_conv_stem_keeps_one_token_per_patch_in_place(mcfg):
    "model.patch_stem='conv': the same grid; token (r, c) sees its patch (and a few pixels up and left), not far away."
    torch.manual_seed(0)
    stem = PatchEmbed(3, mcfg.d_model, 8, stem="conv").eval()
    images = torch.rand(1, 3, 32, 48)
    changed = images.clone(); changed[..., 24:32, 40:48] = 0  # the bottom-right patch only
    with torch.no_grad():
        (a, grid), (b, _) = stem(images), stem(changed)
    assert grid == (4, 6) and a.shape == (1, 24, mcfg.d_model)
    moved = (a - b).abs().amax(-1).view(4, 6)
    assert moved[3, 5] > 0 and moved[:2, :4].max() == 0  # far patches are untouched


def test_conv_stem_needs_a_power_of_two_patch():
    from r1_scratch.config import ConfigError, apply_overrides
    with pytest.raises(ConfigError, match="power of two"):
        apply_overrides(get_preset("tiny"), ["model.patch_stem=conv", "model.image_size=36", "model.patch_size=6"])
    cfg = apply_overrides(get_preset("tiny"), ["model.patch_stem=conv"])
    out = VisionEncoder(cfg.model)(torch.rand(2, 3, 32, 32))
    assert out.tokens.shape == (2, 16, cfg.model.d_model) and out.tokens.isfinite().all()
