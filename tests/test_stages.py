"""The three training stages as a user meets them: what each loss hides and scores, the contrastive loss and its
negatives across ranks, the answer scoring of stage 3, and one-modality batches."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from r1_scratch.align import (MAX_LOGIT_SCALE, align_objective, align_stage, caption_keys, config_swaps,
                              contrastive_loss, embed_split, gather_rows, global_hard_negatives, mid_sentence_token,
                              retrieval_metrics, swap_one_word, uniformity, word_swaps)
from r1_scratch.config import SHAPE_WORDS, get_preset, with_data_root
from r1_scratch.data import IGNORE_INDEX, TextTokenizer, build_loader
from r1_scratch.model import PRETRAIN_LOSSES, R1Model, model_flops
from r1_scratch.pretrain import batch_modality, patchify, pretrain_stage, span_mask, uncertainty_weighted
from r1_scratch.config import apply_overrides
from r1_scratch.sft import blind_accuracy, final_answer, is_correct, prompts_of, select_rows, sft_stage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cfg():
    return with_data_root(get_preset("tiny"), REPO)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return R1Model(cfg.model).eval()


def test_one_source_per_batch_keeps_each_batch_to_one_source_and_follows_the_weights(cfg):
    loader = build_loader(cfg, "train", {"scenes": 0.75, "text": 0.25}, batch_size=4, one_source_per_batch=True)
    sources = [set(b["source"]) for _, b in zip(range(80), loader)]
    assert all(len(s) == 1 for s in sources)
    share = sum(s == {"scenes"} for s in sources) / len(sources)
    assert 0.6 < share < 0.9, share
    mixed = build_loader(cfg, "train", {"scenes": 0.5, "text": 0.5}, batch_size=8)
    assert any(len(set(b["source"])) == 2 for _, b in zip(range(10), mixed))  # the default still mixes


def test_patchify_orders_patches_as_the_vision_encoder_does(model):
    vision = model.encoders.vision
    images = torch.rand(2, 3, 32, 32)
    conv = torch.nn.Conv2d(3, 1, vision.patch, vision.patch, bias=False)
    with torch.no_grad():
        conv.weight.zero_(); conv.weight[0, 1, 2, 5] = 1.0   # picks channel 1, row 2, column 5 of each patch
    tokens = conv(images).flatten(2).transpose(1, 2)[..., 0]  # (B, N) in PatchEmbed's order
    index = (2 * vision.patch + 5) * 3 + 1                     # the same pixel in patchify's (row, col, channel) layout
    assert torch.equal(patchify(images, vision.patch)[..., index], tokens)


def test_a_hidden_patch_or_mel_frame_does_not_leak_into_the_output(model):
    vision, audio = model.encoders.vision, model.encoders.audio
    images = torch.rand(2, 3, 32, 32)
    hidden = torch.zeros(2, 16, dtype=torch.bool); hidden[:, 5] = True      # patch 5: row 1, column 1
    changed = images.clone(); changed[:, :, 8:16, 8:16] = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(vision(images, patch_mask=hidden).tokens, vision(changed, patch_mask=hidden).tokens)
        assert not torch.equal(vision(images).tokens, vision(changed).tokens)
        mel, frames = audio.mel(torch.randn(2, 16000), torch.tensor([16000, 12000]))
        mel_hidden = torch.zeros(mel.shape[0], mel.shape[-1], dtype=torch.bool); mel_hidden[:, 20:40] = True
        noisy = mel.clone(); noisy[..., 20:40] = torch.randn_like(noisy[..., 20:40])
        assert torch.equal(audio.encode_mel(mel, frames, mel_hidden).tokens, audio.encode_mel(noisy, frames, mel_hidden).tokens)


def test_span_mask_hides_about_the_ratio_and_never_padding():
    lengths = torch.tensor([30, 7] * 300)
    hidden = span_mask(lengths, 32, ratio=0.5, span=3)
    assert not hidden[0::2, 30:].any() and not hidden[1::2, 7:].any()
    assert 0.42 < hidden[0::2, :30].float().mean() < 0.58


def test_uncertainty_weights_settle_at_each_loss_scale():
    losses = {"text_mlm": torch.tensor(6.0), "audio_frames": torch.tensor(0.3)}
    log_var = torch.zeros(len(PRETRAIN_LOSSES), requires_grad=True)
    opt = torch.optim.SGD([log_var], lr=0.1)
    for _ in range(500):
        opt.zero_grad(); uncertainty_weighted(losses, log_var).backward(); opt.step()
    weights = dict(zip(PRETRAIN_LOSSES, torch.exp(-log_var).tolist()))
    assert weights["text_mlm"] == pytest.approx(1 / 6.0, rel=0.02) and weights["audio_frames"] == pytest.approx(1 / 0.3, rel=0.02)
    assert weights["decoder_lm"] == 1.0  # a loss that never appears keeps its weight


def test_batch_modality_follows_what_a_batch_holds(cfg):
    kinds = {src: batch_modality(next(iter(build_loader(cfg, "val", {src: 1.0}, batch_size=4, num_workers=0))))
             for src in ("text", "scenes", "speech")}
    assert kinds == {"text": "text", "scenes": "image", "speech": "audio"}


def test_contrastive_loss_matches_clip_and_is_lowest_for_matched_pairs():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    logits = 10 * a @ b.T
    clip = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    assert contrastive_loss(a, b, torch.tensor(10.0)) == pytest.approx(clip.item(), rel=1e-6)
    assert contrastive_loss(a, a, torch.tensor(100.0)) < 1e-3 < contrastive_loss(a, a.roll(1, 0), torch.tensor(100.0))


def test_captions_of_one_class_share_a_key_and_are_positives(cfg):
    batch = next(iter(build_loader(cfg, "val", {"digits": 1.0}, batch_size=32, num_workers=0)))
    keys = caption_keys(batch)
    for i in range(32):
        for j in range(32):  # same digit <=> same key, although the captions' templates differ
            assert (keys[i] == keys[j]) == (batch["label"][i] == batch["label"][j])
    texts = {tuple(batch["text_ids"][i][batch["text_mask"][i]].tolist()) for i in range(32) if batch["label"][i] == batch["label"][0]}
    assert len(texts) > 1 or sum(l == batch["label"][0] for l in batch["label"]) == 1
    # without labels, identical captions share a key and different ones do not
    scenes = next(iter(build_loader(cfg, "val", {"scenes": 1.0}, batch_size=8, num_workers=0)))
    assert scenes["label"] == [None] * 8 and len(set(caption_keys(scenes).tolist())) == 8
    # a keyed loss spreads each row's target over every pair with its key (multi-positive), in both directions
    torch.manual_seed(0)
    text, image = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(4, 16), dim=-1)
    keys = torch.tensor([5, 5, 1, 2])
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    logits = 10 * text @ image.T
    expected = -(target * logits.log_softmax(1)).sum(1).mean() / 2 - (target * logits.T.log_softmax(1)).sum(1).mean() / 2
    assert contrastive_loss(text, image, torch.tensor(10.0), keys).item() == pytest.approx(expected.item(), rel=1e-6)
    assert contrastive_loss(text, image, torch.tensor(10.0), torch.arange(4)).item() == pytest.approx(
        contrastive_loss(text, image, torch.tensor(10.0)).item(), rel=1e-6)  # distinct keys: CLIP's one-hot loss


def test_hard_negatives_swap_one_shape_word_of_each_scene_caption(cfg):
    tok = TextTokenizer.from_file(cfg.data.tokenizer)
    swaps = config_swaps(cfg)
    shapes = {mid_sentence_token(tok, w) for w in SHAPE_WORDS}
    assert set(swaps.counts.nonzero().flatten().tolist()) == shapes and set(swaps.counts[list(shapes)].tolist()) == {5}
    digits = next(iter(build_loader(cfg, "val", {"digits": 1.0}, batch_size=16, num_workers=0)))
    _, changed = swap_one_word(digits["text_ids"], digits["text_mask"], swaps)
    assert not changed.any()                                      # a digit's caption names no shape
    batch = next(iter(build_loader(cfg, "val", {"scenes": 1.0}, batch_size=32, num_workers=0)))
    ids, mask = batch["text_ids"], batch["text_mask"]
    swapped, changed = swap_one_word(ids, mask, swaps, torch.Generator().manual_seed(0))
    diff = (swapped != ids)
    has_shape = torch.tensor([any(t in shapes for t in row[m].tolist()) for row, m in zip(ids, mask)])
    assert changed.tolist() == has_shape.tolist() and has_shape.any()
    assert diff.sum(1).tolist() == changed.long().tolist() and not (diff & ~mask).any()   # one real token per row
    assert all(int(ids[diff][i]) in shapes and int(swapped[diff][i]) in shapes for i in range(int(diff.sum())))
    # the same generator seed gives the same negatives (the evaluation's are fixed)
    again, _ = swap_one_word(ids, mask, swaps, torch.Generator().manual_seed(0))
    assert torch.equal(again, swapped)


def test_hard_negatives_are_checked_against_the_tokenizer(cfg):
    bad = apply_overrides(cfg, ["stages.align.options.swap_words=[[circle, rhombicuboctahedron]]"])
    with pytest.raises(ValueError, match="stages.align.options.swap_words: swap word 'rhombicuboctahedron' is"):
        config_swaps(bad)
    tok = TextTokenizer.from_file(cfg.data.tokenizer)
    with pytest.raises(ValueError, match="two different words"): word_swaps(tok, [["circle", "circle"]])
    with pytest.raises(ValueError, match="in two groups"): word_swaps(tok, [["circle", "star"], ["red", "star"]])
    assert config_swaps(apply_overrides(cfg, ["stages.align.options.swap_words=[]"])) is None
    with pytest.raises(ValueError, match="hard_negatives is on but swap_words names no words"):
        align_stage(apply_overrides(cfg, ["stages.align.options.swap_words=[]", "stages.align.options.hard_negatives=true"]))


def test_hard_negatives_enter_the_loss_only_on_the_image_side():
    torch.manual_seed(0)
    text, image, hard = (F.normalize(torch.randn(n, 16), dim=-1) for n in (6, 6, 3))
    logits, extra = 10 * text @ image.T, 10 * image @ hard.T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(torch.cat([logits.T, extra], 1), torch.arange(6))) / 2
    assert contrastive_loss(text, image, torch.tensor(10.0), hard=hard).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_swap_that_is_another_pairs_caption_is_not_a_negative():
    e = dict(has_hard=torch.tensor([True, True, False]), hard=torch.eye(3), hard_keys=torch.tensor([11, 22, 33]))
    kept = global_hard_negatives(e, torch.tensor([True, True, True]), keys=torch.tensor([22, 44, 55]))
    assert torch.equal(kept, torch.eye(3)[:1])  # row 1's swap is word for word pair 22's caption; row 2 has none


def test_align_stage_trains_on_hard_negatives_only_when_asked_and_always_reports_them(cfg, model):
    on, off = (apply_overrides(cfg, [f"stages.align.options.hard_negatives={v}", "stages.align.batch_size=16"])
               for v in ("true", "false"))
    batch = next(iter(build_loader(cfg, "train", {"scenes": 1.0}, batch_size=16, num_workers=0)))
    torch.manual_seed(0); _, _, with_hard = align_stage(on).loss(model, batch)
    torch.manual_seed(0); _, _, without = align_stage(off).loss(model, batch)
    assert "own_caption_image" in with_hard and "own_caption_image" not in without
    assert with_hard["loss_image"] > without["loss_image"]      # more negatives, a harder classification
    metrics = align_stage(off).evaluate(model)                  # the stage's own evaluation reports the test
    assert metrics["image_own_caption_pairs"] == 120 and metrics["audio_own_caption_pairs"] == 40  # every scene, clip
    assert 0.3 < metrics["image_own_caption"] < 0.7              # an untrained model: about a coin toss


def test_retrieval_counts_any_item_of_the_same_class_as_correct(cfg, model):
    e = embed_split(model, cfg, ["digits"])
    keyed = retrieval_metrics(e, "image")
    n = int(e["has_image"].sum())
    assert keyed["image_chance_R@1"] == pytest.approx(sum((e["keys"] == k).sum().item() ** 2 for k in e["keys"].unique()) / n ** 2)
    assert 0.08 < keyed["image_chance_R@1"] < 0.13               # ten classes, not one caption per image
    # a digit image whose top caption names its digit in other words is a hit
    sim = e["text"].float() @ e["image"].float().T
    top = sim.argmax(0)                                           # each image's best caption
    expected = (e["keys"][top] == e["keys"]).float().mean().item()
    assert keyed["image_x2t_R@1"] == pytest.approx(expected)


def test_sft_loss_average_is_checked(cfg):
    with pytest.raises(ValueError, match="stages.sft.options.loss_average: expected one of 'answer', 'token'"):
        sft_stage(apply_overrides(cfg, ["stages.sft.options.loss_average=tokens"]))  # the config refuses it
    token = sft_stage(apply_overrides(cfg, ["stages.sft.options.loss_average=token"]))
    assert token.count is not sft_stage(cfg).count                  # tokens, not answers, weigh the loss


def test_uniformity_prefers_spread_embeddings():
    torch.manual_seed(0)
    spread = F.normalize(torch.randn(100, 8), dim=-1)
    crowded = F.normalize(torch.randn(100, 8) * 0.05 + torch.ones(8), dim=-1)
    assert uniformity(spread) < uniformity(crowded) - 1


def test_learned_temperature_is_clamped_at_clip_limit(cfg):
    model = R1Model(cfg.model).eval()
    batch = next(iter(build_loader(cfg, "val", {"scenes": 1.0}, batch_size=4, num_workers=0)))
    assert align_objective(model, batch)["scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad(): model.heads.logit_scale.fill_(10.0)
    assert align_objective(model, batch)["scale"].item() == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)
    assert align_objective(model, batch, temperature=0.1)["scale"].item() == pytest.approx(10.0)


def _gather_worker(rank: int, world: int, port: int, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    weight = torch.randn(6, 4, requires_grad=True)            # the same "encoder" on both ranks
    x, y = torch.randn(8, 6), torch.randn(8, 6)               # the same global batch on both ranks
    rows = [[0, 1, 2], [3, 4, 5, 6, 7]][rank]                 # unequal shares of it
    a, b = F.normalize(x[rows] @ weight, dim=-1), F.normalize(y[rows] @ weight, dim=-1)
    keys = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])             # two classes straddle the ranks' shares
    loss = contrastive_loss(gather_rows(a), gather_rows(b), torch.tensor(5.0), gather_rows(keys[rows])) * len(rows) / 8
    loss.backward()
    dist.all_reduce(weight.grad)                               # what DDP does (it averages; world x loss undoes it)
    queue.put((rank, weight.grad.clone(), len(gather_rows(a))))
    dist.destroy_process_group()


def test_negatives_are_gathered_across_ranks_with_gradients():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29700 + os.getpid() % 200
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs: p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs: p.join(timeout=60)
    torch.manual_seed(0)
    weight = torch.randn(6, 4, requires_grad=True)
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    contrastive_loss(F.normalize(x @ weight, dim=-1), F.normalize(y @ weight, dim=-1), torch.tensor(5.0),
                     torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])).backward()
    for rank, grad, rows in results:
        assert rows == 8                                       # every rank compared against all 8 pairs
        torch.testing.assert_close(grad, weight.grad, rtol=1e-5, atol=1e-7)


def test_prompts_of_cuts_each_row_before_its_answer(cfg):
    tok = TextTokenizer.from_file(cfg.data.tokenizer)
    batch = next(iter(build_loader(cfg, "val", {"vqa": 1.0}, batch_size=6, num_workers=0)))
    prompt = prompts_of(batch)
    for i in range(6):
        n = int(prompt["attention_mask"][i].sum())
        full = batch["input_ids"][i][batch["attention_mask"][i]].tolist()
        assert prompt["input_ids"][i][:n].tolist() == full[:n]
        assert all(label == IGNORE_INDEX for label in batch["labels"][i][:n].tolist())
        assert tok.decode(full[n:]).strip() == batch["answer"][i]   # what follows the prompt is the answer
    picked = select_rows(batch, [1, 4])
    assert picked["answer"] == [batch["answer"][1], batch["answer"][4]] and picked["input_ids"].shape[0] == 2


def test_answers_are_scored_by_exact_match_or_final_answer():
    assert is_correct("vqa", "Red.", "red") and not is_correct("vqa", "red square", "red")
    assert is_correct("reasoning", "Step 1: 2 + 2 = 4. Answer: 4", "4")
    assert not is_correct("reasoning", "Answer: 4. Step 2: no, Answer: 5", "4")  # the last answer counts
    assert final_answer("nothing") == ""


def test_blind_accuracy_is_leave_one_out():
    assert blind_accuracy(["q"] * 4, ["a", "a", "a", "b"]) == 0.75
    assert blind_accuracy(["q1", "q2", "q3"], ["x", "y", "z"]) == 0.0     # unique answers: nothing to copy
    assert blind_accuracy(["q1", "q2", "q3"], ["x", "x", "y"]) == pytest.approx(2 / 3)  # falls back to the commonest


def matmul_params(module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if p.dim() >= 2 and "embedding" not in n)


def test_stages_1_and_2_count_the_flops_of_what_they_train(cfg, model):
    "MFU of stages 1 and 2: each encoder's parameters times the tokens it reads; the decoder only on stage 1's text."
    full = apply_overrides(cfg, ["stages.pretrain.mixture={text: 0.4, scenes: 0.3, speech: 0.3}",
                                 "stages.pretrain.options.masking=0.15"])
    pretrain = pretrain_stage(full)
    kinds = {}
    for batch in build_loader(full, "train", {"text": 0.4, "scenes": 0.3, "speech": 0.3}, batch_size=8,
                              num_workers=0, one_source_per_batch=True):
        kinds.setdefault(batch_modality(batch), batch)
        if len(kinds) == 3: break
    enc = model.encoders
    image, audio, text = kinds["image"], kinds["audio"], kinds["text"]
    patches = int(image["has_image"].sum()) * model.cfg.n_patches
    assert pretrain.flops(model, image) == 6 * matmul_params(enc.vision) * patches
    assert pretrain.tokens(model, image) == patches
    frames = int(enc.audio.frame_lengths(audio["audio_lengths"][audio["audio_lengths"] > 0]).sum())
    assert pretrain.flops(model, audio) == 6 * matmul_params(enc.audio) * frames
    mlm = 6 * matmul_params(enc.text) * int(text["text_mask"].sum())
    assert pretrain.flops(model, text) == model_flops(model, text) + mlm  # the decoder's LM and the masked LM
    align = align_stage(cfg)
    batch = next(iter(build_loader(cfg, "train", {"scenes": 0.5, "speech": 0.5}, batch_size=16, num_workers=0)))
    tokens = (int(batch["text_mask"].sum()), int(batch["has_image"].sum()) * model.cfg.n_patches,
              int(enc.audio.frame_lengths(batch["audio_lengths"][batch["audio_lengths"] > 0]).sum()))
    assert align.tokens(model, batch) == sum(tokens) and min(tokens) > 0
    expected = 6 * sum(matmul_params(e) * n for e, n in zip((enc.text, enc.vision, enc.audio), tokens))
    assert align.flops(model, batch) == expected
