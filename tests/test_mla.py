"""Multi-head latent attention as a user meets it: its two forms agree, the decoder trains every stage with it
through the launch and resumes after kill -9, and generation from its latent cache equals recomputation."""
import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from r1_scratch.config import ConfigError, apply_overrides, get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.mla import MultiHeadLatentAttention, apply_rope, cache_bytes, cache_elements_per_token
from r1_scratch.model import R1Model, generate
from r1_scratch.sft import prompts_of

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_launch import SHORT, STAGE_DIRS, kill_9_at, launch, losses  # noqa: E402  the launch tests' short stages

MLA = ["model.attention=mla", *SHORT]


def test_naive_and_absorbed_forms_agree_with_and_without_a_cache():
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(64, 4, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                     v_head_dim=16).eval()
    x, pos = torch.randn(2, 9, 64), torch.arange(9).expand(2, -1)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    full, (c, k_pe) = layer(x, pos, attn_mask=causal, return_kv=True)
    assert c.shape == (2, 9, 48) and k_pe.shape == (2, 9, 8)
    torch.testing.assert_close(layer(x, pos, attn_mask=causal, absorb=True), full, atol=1e-5, rtol=1e-4)
    past = (c[:, :6], k_pe[:, :6])
    for absorb in (False, True):
        tail = layer(x[:, 6:], pos[:, 6:], attn_mask=causal[:, 6:], past_kv=past, absorb=absorb)
        torch.testing.assert_close(tail, full[:, 6:], atol=1e-5, rtol=1e-4)
    shifted = layer(x, pos + 5, attn_mask=causal)  # RoPE is relative: a common shift of positions changes nothing
    torch.testing.assert_close(shifted, full, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(layer(x, pos.flip(1), attn_mask=causal), full, atol=1e-3)  # but order does


def test_rope_rotates_pairs_and_needs_an_even_width():
    x = torch.tensor([[[[1.0, 0.0]]]])
    turned = apply_rope(x, torch.tensor([[1]]))  # one radian for the first pair
    torch.testing.assert_close(turned[0, 0, 0], torch.tensor([0.5403023, 0.8414710]))
    with pytest.raises(ValueError, match="must be even"):
        MultiHeadLatentAttention(64, 4, 0, 48, 16, 7, 16)
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        apply_overrides(get_preset("tiny"), ["model.qk_rope_head_dim=5"])
    with pytest.raises(ConfigError, match="model.attention"):
        apply_overrides(get_preset("tiny"), ["model.attention=gqa"])


def test_generation_from_the_latent_cache_equals_recomputation():
    cfg = apply_overrides(with_data_root(get_preset("tiny"), REPO), ["model.attention=mla"])
    torch.manual_seed(0)
    model = R1Model(cfg.model).eval()
    prompts = prompts_of(next(iter(build_loader(cfg, "train", {"vqa": 0.5, "audio_qa": 0.5}, batch_size=6))))
    cached = generate(model, prompts, max_new_tokens=8)
    assert cached == generate(model, prompts, max_new_tokens=8, use_cache=False)
    assert len(cached) == 6 and all(len(row) == 8 for row in cached)
    with torch.no_grad():
        out = model(prompts, return_kv=True)
    tokens = prompts["input_ids"].shape[0] * out.info.valid.shape[1]
    assert cache_bytes(out.kv) == cache_elements_per_token(cfg.model, "mla") * 4 * tokens  # fp32: only the latent


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    launch("--name", "whole", f"train.out_dir={out}", "stages.sft.steps=8", "train.ckpt_every=2", *MLA)
    return out / "whole"


def test_launch_with_mla_trains_every_stage(unbroken):
    assert sorted(p.name for p in unbroken.iterdir()) == STAGE_DIRS
    steps = losses(unbroken)
    assert list(steps) == list(range(1, 9)) and steps[8] < steps[1]
    assert "attention: mla" in (unbroken / "config.yaml").read_text()
    for stage in ("pretrain", "align", "sft"):
        assert json.loads((unbroken / stage / "summary.json").read_text())["steps"] > 0


def test_launch_with_mla_resumes_after_kill_9(unbroken, tmp_path):
    args = ["--name", "broken", f"train.out_dir={tmp_path}", "stages.sft.steps=8", "train.ckpt_every=2", *MLA]
    target = tmp_path / "broken" / "sft" / "checkpoints" / "step_000004" / "meta.json"
    assert kill_9_at(args, target) == -signal.SIGKILL
    assert target.exists() and not (tmp_path / "broken" / "sft" / "summary.json").exists()
    launch(*args)
    assert losses(tmp_path / "broken") == losses(unbroken)  # bit-exact on CPU: the MLA weights came back whole
