"""The text encoder as a user meets it: buckets, padding, mixed lengths, too-long input, masking, gradients."""
import math

import pytest
import torch

from r1_scratch.config import get_preset
from r1_scratch.data import IGNORE_INDEX
from r1_scratch.text import (LearnedPositions, MaskedLMHead, RelativePositionBias, TextEncoder, alibi_bias,
                             alibi_slopes, mask_tokens, mlm_loss, relative_position_bucket)

MASK_ID, SPECIAL = 4, (0, 1, 2, 4)  # <mask>; <pad>, <bos>, <eos>, <mask>


@pytest.fixture(scope="module")
def mcfg():
    return get_preset("tiny").model


def batch(lengths, vocab, seed=0):
    "Right-padded random ids (B, L) and mask (B, L) for the given lengths."
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(8, vocab, (len(lengths), L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_bucket_values_match_t5():
    rel = torch.tensor([0, -1, -7, -8, -16, -32, -64, -90, -91, -128, -10_000, 1, 7, 8, 16, 64, 128, 10_000])
    expected = [0, 1, 7, 8, 10, 12, 14, 14, 15, 15, 15, 17, 23, 24, 26, 30, 31, 31]
    assert relative_position_bucket(rel, True, 32, 128).tolist() == expected
    # causal (unidirectional): keys to the right all share bucket 0, distances to the left use all 32 buckets
    assert relative_position_bucket(torch.tensor([5, 0, -3, -16, -1000]), False, 32, 128).tolist() == [0, 0, 3, 16, 31]
    # a smaller max_distance reaches the last bucket sooner
    assert relative_position_bucket(torch.tensor([-49, -50, -64]), True, 32, 64).tolist() == [14, 15, 15]


def test_relative_bias_is_toeplitz_and_length_free():
    rpb = RelativePositionBias(n_heads=3, n_buckets=32, max_distance=128)
    bias = rpb(7, 9)
    assert bias.shape == (3, 7, 9)
    assert torch.equal(bias[:, 1:, 1:], bias[:, :-1, :-1])
    assert torch.equal(bias[1, 2, 6], rpb.table.weight[relative_position_bucket(torch.tensor(4)), 1])
    assert rpb(600).shape == (3, 600, 600)  # no parameter depends on the length


def test_alibi_values():
    assert torch.allclose(alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    assert len(alibi_slopes(12)) == 12 and (alibi_slopes(12) > 0).all()
    bias = alibi_bias(4, 6)
    assert bias.shape == (4, 6, 6)
    assert bias[0, 1, 5].item() == pytest.approx(-4 * 0.25) and bias[0, 5, 1].item() == pytest.approx(-4 * 0.25)
    assert bias[3].diagonal().abs().sum() == 0


@pytest.mark.parametrize("kind", ["t5", "alibi", "learned"])
def test_mixed_lengths_shapes(mcfg, kind):
    enc = TextEncoder(mcfg, kind).eval()
    ids, mask = batch([17, 3, 1, 9], mcfg.vocab_size)
    out = enc(ids, mask)
    assert out.tokens.shape == (4, 17, mcfg.d_model) and out.pooled.shape == (4, mcfg.d_model)
    assert torch.equal(out.mask, mask) and torch.isfinite(out.tokens).all()
    assert enc(ids).tokens.shape == (4, 17, mcfg.d_model)  # mask=None: every token is real


@pytest.mark.parametrize("kind", ["t5", "alibi", "learned"])
def test_padding_invariance(mcfg, kind):
    enc = TextEncoder(mcfg, kind).eval()
    lengths = [20, 7, 1]
    ids, mask = batch(lengths, mcfg.vocab_size, seed=1)
    ids_other_pad = ids.masked_fill(~mask, 123)  # what sits in the padding must not matter either
    with torch.no_grad():
        out, out2 = enc(ids, mask), enc(ids_other_pad, mask)
        for b, n in enumerate(lengths):
            alone = enc(ids[b : b + 1, :n])
            torch.testing.assert_close(out.tokens[b, :n], alone.tokens[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.pooled[b], alone.pooled[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.pooled, out2.pooled, atol=1e-5, rtol=1e-4)


def test_relative_bias_left_padding_invariance(mcfg):
    enc = TextEncoder(mcfg, "t5").eval()
    ids, _ = batch([10], mcfg.vocab_size, seed=2)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.arange(15)[None] >= 5
    with torch.no_grad():
        torch.testing.assert_close(enc(padded, mask).tokens[0, 5:], enc(ids).tokens[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(enc(padded, mask).pooled, enc(ids).pooled, atol=1e-5, rtol=1e-4)


def test_learned_positions_refuse_too_long_input(mcfg):
    enc = TextEncoder(mcfg, "learned")
    too_long = torch.zeros(1, mcfg.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{mcfg.max_seq_len + 1} tokens.*max_positions={mcfg.max_seq_len}"):
        enc(too_long)
    assert enc(too_long[:, :-1]).tokens.shape[1] == mcfg.max_seq_len  # exactly the limit is fine
    assert TextEncoder(mcfg, "t5")(too_long).tokens.shape[1] == mcfg.max_seq_len + 1
    with pytest.raises(ValueError, match="max_positions=4"):
        LearnedPositions(4, 8)(5)


def test_unknown_position_bias_is_refused(mcfg):
    with pytest.raises(ValueError, match="'rope'"):
        TextEncoder(mcfg, "rope")


def test_mask_tokens_never_masks_padding_or_specials_and_masks_15_percent():
    ids, mask = batch(list(range(40, 296, 4)), 2048, seed=3)  # 64 rows of 40..292 real tokens
    ids[:, 0] = 1  # <bos>
    inputs, labels = mask_tokens(ids, mask, MASK_ID, 2048, p=0.15, generator=torch.Generator().manual_seed(0),
                                 special_ids=SPECIAL)
    picked = labels != IGNORE_INDEX
    assert not picked[~mask].any() and not picked[:, 0].any()
    assert torch.equal(inputs[~mask], ids[~mask])  # padding untouched
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(inputs[~picked], ids[~picked])
    eligible = mask.sum() - len(ids)
    assert abs(picked.sum().item() / eligible.item() - 0.15) < 0.01
    replaced = inputs[picked]
    assert abs((replaced == MASK_ID).float().mean().item() - 0.8) < 0.02
    assert abs((replaced == ids[picked]).float().mean().item() - 0.1) < 0.02
    assert not torch.isin(replaced[replaced != MASK_ID], torch.tensor(SPECIAL)).any()  # no random specials


def test_mask_tokens_is_deterministic_with_a_generator():
    ids, mask = batch([30, 12], 2048)
    a = mask_tokens(ids, mask, MASK_ID, 2048, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, mask, MASK_ID, 2048, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gradients_reach_the_bias_table_and_tied_embedding(mcfg):
    torch.manual_seed(0)
    enc = TextEncoder(mcfg, "t5")
    head = MaskedLMHead(mcfg.d_model, mcfg.vocab_size, enc.embed)
    assert head.decoder.weight is enc.embed.weight
    ids, mask = batch([32, 20, 8], mcfg.vocab_size, seed=4)
    loss, metrics = mlm_loss(enc, head, ids, mask, MASK_ID, generator=torch.Generator().manual_seed(0),
                             special_ids=SPECIAL)
    assert loss.item() == pytest.approx(math.log(mcfg.vocab_size), abs=0.5)  # untrained: near uniform
    assert 0 < metrics["predicted"] <= mask.sum() and 0 <= metrics["accuracy"] <= 1
    loss.backward()
    grad = enc.relative_bias.table.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert enc.embed.weight.grad.abs().sum() > 0


def test_mlm_loss_with_nothing_picked_is_zero_not_nan(mcfg):
    enc = TextEncoder(mcfg, "t5")
    head = MaskedLMHead(mcfg.d_model, mcfg.vocab_size)
    ids, mask = batch([5, 3], mcfg.vocab_size)
    loss, metrics = mlm_loss(enc, head, ids, mask, MASK_ID, p=0.0)
    assert loss.item() == 0.0 and metrics["predicted"] == 0


def test_meta_device_build_counts_parameters():
    for preset in ("tiny", "small", "base"):
        m = get_preset(preset).model
        with torch.device("meta"):
            t5, learned = TextEncoder(m, "t5"), TextEncoder(m, "learned")
        n_t5, n_learned = (sum(p.numel() for p in e.parameters()) for e in (t5, learned))
        assert n_learned - n_t5 == m.max_seq_len * m.d_model - m.rel_buckets * m.n_heads
