"""Fusion as later stages use it: the cross-modal mask's rules, missing modalities, batch independence."""
import pytest
import torch

from r1_scratch.config import get_preset
from r1_scratch.fusion import MODALITY_IDS, DecoderInputs, MultiModalEncoder, cross_modal_mask

IMG, AUD, TXT = (MODALITY_IDS[m] for m in ("image", "audio", "text"))


def layout(n_img, n_aud, n_txt, pad_aud=0, pad_txt=0):
    modality = torch.tensor([[IMG] * n_img + [AUD] * (n_aud + pad_aud) + [TXT] * (n_txt + pad_txt)])
    valid = torch.tensor([[True] * n_img + [True] * n_aud + [False] * pad_aud + [True] * n_txt + [False] * pad_txt])
    return modality, valid


def test_mask_rules_hold_on_random_layouts():
    torch.manual_seed(0)
    for _ in range(20):
        n_img, n_aud, n_txt, pad_aud, pad_txt = torch.randint(0, 5, (5,)).tolist()
        modality, valid = layout(n_img, n_aud, n_txt + 1, pad_aud, pad_txt)
        m = cross_modal_mask(modality, valid)[0]
        q, k = modality[0][:, None], modality[0][None, :]
        real_q, real_k = valid[0][:, None], valid[0][None, :]
        idx = torch.arange(len(valid[0]))
        text_to_prefix = (q == TXT) & (k != TXT) & real_q & real_k
        assert m[text_to_prefix].all()                                      # text sees every real prefix token
        assert not m[(q != TXT) & (k == TXT) & (idx[:, None] != idx[None, :])].any()  # prefix never sees text
        text_pairs = (q == TXT) & (k == TXT) & real_q & real_k
        assert torch.equal(m[text_pairs], (idx[:, None] >= idx[None, :]).expand_as(m)[text_pairs])  # causal
        assert not m[~real_k & (idx[:, None] != idx[None, :])].any()       # padding is seen by nobody
        assert m.any(1).all()                                              # no empty row (no NaN in softmax)


def test_blocked_pairs_only_block_that_pair():
    modality, valid = layout(2, 2, 3)
    free, blocked = cross_modal_mask(modality, valid)[0], cross_modal_mask(modality, valid, {("image", "audio")})[0]
    img, aud = slice(0, 2), slice(2, 4)
    assert free[img, aud].all() and not blocked[img, aud].any() and not blocked[aud, img].any()
    changed = free != blocked
    assert changed[img, aud].all() and changed[aud, img].all() and changed.sum() == 8


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return get_preset("tiny").model


def fake_batch(mcfg, has_image, audio_lengths, text_lengths):
    B = len(has_image)
    L = max(max(text_lengths), 1)
    text_mask = torch.arange(L)[None] < torch.tensor(text_lengths)[:, None]
    n = max(max(audio_lengths), 1)
    audio = torch.randn(B, n) * 0.1 * (torch.arange(n)[None] < torch.tensor(audio_lengths)[:, None])
    return dict(text_ids=torch.randint(5, mcfg.vocab_size, (B, L)) * text_mask, text_mask=text_mask,
                images=torch.rand(B, 3, mcfg.image_size, mcfg.image_size), has_image=torch.tensor(has_image),
                audio=audio, audio_lengths=torch.tensor(audio_lengths))


def test_missing_modalities_give_finite_embeddings_of_what_is_there(tiny):
    encoder = MultiModalEncoder(tiny).eval()
    batch = fake_batch(tiny, [True, False, False, True], [8000, 16000, 0, 0], [5, 0, 7, 3])
    with torch.no_grad():
        out = encoder(batch)
    assert torch.isfinite(out.fused).all()
    assert out.present.tolist() == [[True, True, True], [False, False, True], [True, False, False], [True, True, False]]
    assert torch.allclose(out.fused[2], out.text[2])                  # text only: fused = text embedding
    assert torch.allclose(out.fused[1], out.audio[1])                 # audio only
    assert out.image[1].abs().sum() == 0 and out.text[1].abs().sum() == 0


def test_decoder_inputs_positions_skip_padding(tiny):
    encoder, inputs = MultiModalEncoder(tiny).eval(), DecoderInputs(tiny.d_model, tiny.d_model, tiny.vocab_size)
    batch = fake_batch(tiny, [True, False], [0, 16000], [4, 6])
    with torch.no_grad():
        enc = encoder.encode(batch)
        seq, mask = inputs(enc["image"], enc["audio"], batch["text_ids"], batch["text_mask"])
    for b in range(2):
        real = seq.valid[b]
        assert seq.positions[b][real].tolist() == list(range(int(real.sum())))
    text_start = seq.positions[1][seq.modality[1] == TXT][0].item()
    assert text_start == int(enc["audio"].mask[1].sum())              # text follows the real audio frames only
    assert mask.shape == (2, seq.valid.shape[1], seq.valid.shape[1])
