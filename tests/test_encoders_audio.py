"""The audio encoder as a user meets it: any sample rate, padded batches, empty clips, exact frame counts."""
import math
from pathlib import Path

import pytest
import torch
import torchaudio.functional as AF

from r1_scratch.audio import AudioEncoder, ConvFrontEnd, LogMel, conv_out_length, resample_batch, resampled_lengths
from r1_scratch.config import get_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mcfg():
    return get_preset("tiny").model


@pytest.fixture(scope="module")
def encoder(mcfg):
    torch.manual_seed(0)
    return AudioEncoder(mcfg).eval()


def vowel(seconds: float = 1.3, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    "A speech-like test signal: a gliding 100-220 Hz voice with harmonics up to 4 kHz, syllable-rate loudness."
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    f0 = 160 + 60 * torch.sin(2 * math.pi * 0.8 * t + torch.rand(1, generator=g).item())
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    wave = sum(torch.sin(k * phase) / k for k in range(1, 18))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t) ** 2
    return 0.1 * wave * envelope + 0.002 * torch.randn(len(t), generator=g)


def real_clip(rate: int) -> torch.Tensor:
    "The first spoken caption of the committed validation speech shards, at the model rate."
    from r1_scratch.config import with_data_root
    from r1_scratch.data import build_loader
    cfg = with_data_root(get_preset("tiny"), REPO)
    batch = next(iter(build_loader(cfg, "val", {"speech": 1.0}, batch_size=1)))
    return batch["audio"][0, : batch["audio_lengths"][0]]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("source", ["synthetic", "data_samples"])
def test_16k_and_48k_give_nearly_the_same_features(encoder, mcfg, source):
    wave = vowel() if source == "synthetic" else real_clip(mcfg.sample_rate)
    n16 = torch.tensor([len(wave)])
    wave48, n48 = resample_batch(wave[None], n16, mcfg.sample_rate, 48000)
    wave48 = wave48[0]
    with torch.no_grad():
        a = encoder(wave[None], n16)
        b = encoder(wave48[None], n48, sample_rate=48000)
        raw = encoder(wave48[None], n48)  # 48 kHz read as if 16 kHz: the article's literal version
        mel_a, _ = encoder.logmel(wave[None], n16)
        mel_b, _ = encoder.logmel(*resample_batch(wave48[None], n48, 48000, mcfg.sample_rate))
    assert a.tokens.shape == b.tokens.shape and b.mask.all()
    assert rel_err(mel_b, mel_a) < 0.02
    assert rel_err(b.pooled, a.pooled) < 0.01
    assert raw.tokens.shape[1] >= 2.9 * a.tokens.shape[1] and rel_err(raw.pooled, a.pooled) > 0.1


@pytest.mark.parametrize("rate", [16000, 48000])
def test_padding_invariance(encoder, rate):
    clips = [AF.resample(vowel(s, seed=i), 16000, rate) for i, s in enumerate((0.37, 1.0, 2.2))]  # any filter will do
    clips.append(torch.zeros(0))  # a sample without audio
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.full((len(clips), int(lengths.max())), 0.3)  # junk in the padding: the encoder must ignore it
    for i, c in enumerate(clips): batch[i, : len(c)] = c
    with torch.no_grad():
        both = encoder(batch, lengths, sample_rate=rate)
        for i, c in enumerate(clips[:-1]):
            alone = encoder(c[None], lengths[i : i + 1], sample_rate=rate)
            T = alone.tokens.shape[1]
            assert both.mask[i].sum() == T and not both.mask[i, T:].any()
            torch.testing.assert_close(both.tokens[i, :T], alone.tokens[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(both.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(both.tokens[:, :, 0] != 0, both.mask)  # padded frames are exactly zero


def test_frame_lengths_match_the_convolutions(encoder, mcfg):
    front = ConvFrontEnd(mcfg.n_mels, 16, n_layers=3)
    for T in range(1, 400):
        x, sizes = torch.randn(1, mcfg.n_mels, T), []
        for conv in front.convs: x = conv(x); sizes.append(x.shape[-1])
        assert [n.item() for n in front.frame_lengths(torch.tensor([T]))] == sizes
    assert conv_out_length(torch.tensor([0])).item() == 0
    lengths = torch.tensor([1, 159, 160, 161, 399, 400, 401, 4799, 16000, 47999, 48000])
    for rate in (8000, 16000, 22050, 44100, 48000):
        assert resampled_lengths(lengths, rate, 16000).tolist() == \
            [AF.resample(torch.zeros(n), rate, 16000).shape[-1] for n in lengths.tolist()]
        with torch.no_grad():
            for n in lengths.tolist():
                out = encoder(torch.randn(1, n) * 0.1, torch.tensor([n]), sample_rate=rate)
                assert out.tokens.shape[1] == out.mask.sum() == encoder.frame_lengths(torch.tensor([n]), rate).item()


def test_frame_rate_is_the_configured_one(encoder, mcfg):
    seconds = 60
    tokens = encoder.frame_lengths(torch.tensor([seconds * 48000]), 48000).item()
    assert abs(tokens / seconds - mcfg.audio_frames_per_second) < 0.1


def test_empty_audio_gives_zeros_not_nan(encoder):
    for audio, lengths in [(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long)),
                           (torch.cat([vowel(0.5)[None], torch.zeros(1, 8000)]), torch.tensor([8000, 0]))]:
        with torch.no_grad(): out = encoder(audio, lengths)
        assert not out.tokens.isnan().any() and not out.pooled.isnan().any()
        empty = lengths == 0
        assert not out.mask[empty].any() and out.pooled[empty].abs().max() == 0
        assert out.mask[~empty].sum() == encoder.frame_lengths(lengths[~empty]).sum()
    # gradients through a batch with an empty row stay finite too
    enc = AudioEncoder(get_preset("tiny").model)
    out = enc(torch.cat([vowel(0.5)[None], torch.zeros(1, 8000)]), torch.tensor([8000, 0]))
    out.pooled.sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in enc.parameters())


def test_logmel_is_fp32_under_autocast_and_half(mcfg):
    wave = vowel(0.5)[None]
    n = torch.tensor([wave.shape[-1]])
    ref, frames = LogMel(mcfg)(wave, n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mel, _ = LogMel(mcfg)(wave, n)
    assert mel.dtype == torch.float32 and torch.equal(mel, ref)
    torch.testing.assert_close(LogMel(mcfg).half()(wave, n)[0], ref)
    assert frames.item() == wave.shape[-1] // mcfg.hop_length + 1
    assert -1.1 < ref.min() and ref.max() < 1.6


def test_meta_device_build():
    with torch.device("meta"):
        enc = AudioEncoder(get_preset("base").model)
    assert enc.conv.convs[0].weight.is_meta
    assert sum(p.numel() for p in enc.parameters()) > 50e6
