"""Can the decoder learn to read a scene when the image tokens are perfect? Visual QA on oracle tokens. CPU, minutes.

    python research/2026-12-03-small-visual-qa/decoder_reading.py [--preset tiny] [--steps 1000] [--arms preset lr_1e-3 ...] [--min-lr-ratio R] [--out research/2026-12-03-small-visual-qa/decoder_reading_cpu.json]

Why: `small` answers "Is there a red shape?" no better than a blind guesser and "What shape is on the left?" 0.38 of
the time on fresh questions, with 4x more distinct scenes too, and only 0.70 of all the visual questions it was tuned
on (variant M in research/2026-12-03-small-visual-qa/stages_small_history.json), while linear probes read each object's shape and colour from
the tokens the decoder gets (research/2026-12-03-small-visual-qa/object_probe_small_h200.json). So either the tokens are the limit or the
decoder's way of reading them is. This takes the encoder out: each image is replaced by 64 patch tokens that say
exactly what is there, a fixed random vector per shape, colour and size added to every patch an object touches, a
background vector, and the encoder's own 2-D sin-cos position code, RMS-normalised as the encoder's output is. The
preset's decoder (projector, MoE blocks, LM head; fresh, no stage 1) is trained on the course's scene questions only
(`samples.scene_question`, fresh scenes every step; AdamW with the train config's betas and weight decay, here on
every parameter where the Trainer exempts embeddings and gains; warmup then cosine, as the Trainer's) and scored on
600 other questions per arm, per kind, next to a blind guesser, and on the last 600 it trained on (`train`, each seen
once). An answer counts when every one of its tokens is the argmax under teacher forcing (what greedy decoding would
write).

Arms: `preset`, and arms that change one thing of it, but these: `dense_lr_3e-4` changes two; `dense_register`,
`dense_4x4` and `dense_qk_norm` each change one thing of that, and `qk_norm_lr_3e-4` one thing of `lr_3e-4`.
`no_expert_dropout` (stage 3's 0.3 off); `dense` (SwiGLU FFNs, no MoE); `lr_1e-3` and `lr_3e-4` (the preset's
stage-3 lr: tiny 2e-3, small 3e-4, 1e-3 until session 13); `dense_lr_3e-4` (dense and 3e-4); `dense_register` (one
learned token after the 64 patches, for attention to rest on when no patch matches; weight decay on it too, as on
every parameter here); `dense_4x4` (4 layers of 4 heads instead of tiny's 2 of 2); `dense_qk_norm` and
`qk_norm_lr_3e-4` (QK-norm in the decoder's attention, model.qk_norm, on the dense and the MoE decoder). Options
that change the questions: --kinds (train and score only these), --balanced ("Is there a <colour> shape?" answered
yes half of the time; the course draws the colour at random, so "no" 0.74), --reason (its answer names every shape's
colour first, "red, pink and green, so yes."; scored whole, and by its last word given the right colours as
`final_word_by_kind`). --device runs it on a GPU (default: cuda where there is one); progress every tenth of the
steps.

Measured (tiny's decoder at 64 px, 1,000 steps of 64 questions, ~9 min an arm on 2 cores): 0.35 at tiny's stage-3
lr of 2e-3 (the blind guesser's; the loss is flat from step 100 on), 0.61 at 1e-3 and 0.75 at 3e-4 (shape at
a place 0.84, furthest shape 0.92, count 0.99); the two colour questions stay at the blind bar in these three arms. In
300-step arms at 2e-3 neither the expert dropout nor the MoE moved the score (though the dense arm answered "What
colour is the star?" 0.42 of the time). A fresh decoder at 64 answers a step, where `small`'s has had stage 1 and
steps on some 750: what carries over was for a GPU run to show (research/2026-12-03-small-visual-qa/decoder_reading_cpu.json). It did
carry over: on `small`, stage 3 at 3e-4 instead of 1e-3 took visual QA from 0.61 to 0.86 of 600 fresh questions (runs
N and O in research/2026-12-03-small-visual-qa/stages_small_history.json), and "Is there a red shape?" stayed at the blind bar there too.
Session 13, `session_13` in the JSON: `dense_lr_3e-4` answers "What colour is the star?" 0.64 of the time where the MoE
decoder (`lr_3e-4`) answers 0.14, 0.82 overall; with `--kinds colour_present` both stay at the blind bar (0.72) after
64,000 fresh questions of that one kind (~6 min dense, ~10 min MoE).
Session 14, `session_14`: on that question alone the dense decoder's loss settles where a guesser that knows how many
shapes there are would (0.275 a token), and no change moves it off the blind bar: balanced answers, a register token,
the colours written out first (whole answers right 0.69; given the right colours, the yes or no is the blind guesser's),
three times the steps, or 4 layers of 4 heads.
Session 15, `session_15`: --colours-in-prompt writes the scene's colours before the question, so the answer is in the
text; --image scene|blank|none gives the decoder the scene's tokens, a blank background's or none; --blocked keeps
text and image tokens from attending to each other. In text alone the decoder learns the test (dense 1.0, MoE 0.86);
with any image tokens it can attend to, even 16 blank ones, it stays on the count-aware plateau (0.72); blocked, 0.84.
Session 16, `session_16`: the 16-blank-token arm for 3,000 steps leaves that plateau near step 1,800 and learns the
test (1.0); in text alone the fall comes near step 700. Image tokens delay the escape; they do not prevent it.
Session 17, `session_17`: the same 192,000 questions as 1,500 steps of 128 answer 0.82 and as 750 of 256 0.76: the
fall starts earlier in steps with a bigger batch (~700, ~630) but is slow, so steps, not questions seen, set the escape.
--min-lr-ratio 1.0 (a constant lr after the warmup) does not bring it earlier: in 2,000 steps of 64 it falls from
~1,900, the cosine arm from ~1,400; both answer 0.90.
Session 18, `session_18`: with QK-norm (`dense_qk_norm`) the dense decoder learns the real question from the scene's
64 tokens, no colours in the text: it leaves the plateau near step 400 and answers 0.99 after 3,000 steps, where
without QK-norm it stays at the blind bar (0.72) as long; the MoE decoder with QK-norm (`qk_norm_lr_3e-4`)
leaves it near step 900 and answers 1.0 after 2,000. On all kinds mixed, 1,000 steps, QK-norm lifts the MoE decoder
from 0.75 to 0.83 ("What colour is the star?" 0.14 -> 0.63) and leaves the dense one at 0.81 (0.82 without); "Is there a
red shape?" stays at the blind bar there, with a sixth of the questions. (The colours-in-the-prompt arm with 16 blank tokens did not
leave the plateau with QK-norm in 3,000 steps: QK-norm is no cure for every plateau.)
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from r1_scratch.config import get_preset
from r1_scratch.data import IGNORE_INDEX, TextTokenizer, chat_ids, pad_ids
from r1_scratch.layers import EncoderOutput
from r1_scratch.model import R1Model
from r1_scratch.trainer import lr_lambda
from r1_scratch.samples import (BACKGROUNDS, COLOURS, IMAGE_SIZE, RADIUS, SCENE_QUESTION_KINDS as KINDS, SHAPES, SIZES,
                                join_phrases, pick, random_scene, scene_question_of_kind)
from r1_scratch.sft import answer_loss_sum, blind_accuracy
from r1_scratch.vision import sincos_2d

ARMS = {"preset": {}, "no_expert_dropout": {"expert_dropout": 0.0}, "dense": {"n_dense_layers": None},
        "lr_1e-3": {"lr": 1e-3}, "lr_3e-4": {"lr": 3e-4}, "dense_lr_3e-4": {"n_dense_layers": None, "lr": 3e-4},
        "dense_register": {"n_dense_layers": None, "lr": 3e-4, "registers": 1},
        "dense_4x4": {"n_dense_layers": None, "lr": 3e-4, "n_layers": 4, "n_heads": 4},
        "dense_qk_norm": {"n_dense_layers": None, "lr": 3e-4, "qk_norm": True}, "qk_norm_lr_3e-4": {"lr": 3e-4, "qk_norm": True}}


class Oracle:
    "Perfect patch tokens for a scene: what a flawless vision encoder could give the decoder."
    def __init__(self, dim: int, grid: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        vec = lambda names: {n: torch.randn(dim, generator=g) for n in names}
        self.shape, self.colour, self.size, self.background = vec(SHAPES), vec(COLOURS), vec(SIZES), vec(BACKGROUNDS)
        self.grid, self.positions = grid, sincos_2d(grid, grid, dim).flatten(0, 1)  # (N, D), as the encoder adds

    def patches_of(self, o: dict) -> list[int]:
        "Patches whose square meets the object's bounding box."
        # Not object_probe.object_patches (1.15 radii, edges that only touch left out): the recorded arms used this box,
        # and the two differ for 5,116 of the 134,001 objects of one 1,000-step run's questions.
        cell, r = IMAGE_SIZE / self.grid, RADIUS[o["size"]]
        cols = range(max(int((o["x"] - r) // cell), 0), min(int((o["x"] + r) // cell), self.grid - 1) + 1)
        rows = range(max(int((o["y"] - r) // cell), 0), min(int((o["y"] + r) // cell), self.grid - 1) + 1)
        return [row * self.grid + col for row in rows for col in cols]

    def tokens(self, scene: dict) -> torch.Tensor:
        x = self.positions + self.background[scene["background"]]
        for o in scene["objects"]:
            x[self.patches_of(o)] += self.shape[o["shape"]] + self.colour[o["colour"]] + self.size[o["size"]]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # the encoder ends in an RMSNorm


def balanced_colour_present(rng: np.random.Generator) -> tuple[dict, str, str]:
    "'Is there a <colour> shape?' answered yes half of the time (the course's draws the colour at random: no 0.74)."
    scene = random_scene(rng)
    present = sorted({o["colour"] for o in scene["objects"]})
    yes = bool(rng.random() < 0.5)
    colour = pick(rng, present if yes else [c for c in COLOURS if c not in present])
    return scene, f"Is there a {colour} shape?", "yes" if yes else "no"


def reasoned(scene: dict, answer: str) -> str:
    """A colour_present answer that first names every shape's colour, in reading order: 'red, blue and red, so yes.'
    Lower case, so each colour is the same token as in the question (' Red' is not ' red', and ' Yellow' is three)."""
    return colours_said(scene) + f", so {answer}."


def colours_said(scene: dict) -> str:
    "The scene's colours in reading order, as `reasoned` writes them: 'red, pink and green'."
    return join_phrases([o["colour"] for o in scene["objects"]])


def questions(n: int, seed: int, kinds=KINDS, balanced: bool = False, reason: bool = False,
              colours_in_prompt: bool = False) -> list[tuple[dict, str, str, str]]:
    """`n` (scene, question, answer, kind), `kinds` in turn; `balanced`: colour_present answered yes half of the time;
    `reason`: its answer names the colours first (`reasoned`); `colours_in_prompt`: its question comes after them,
    'red, pink and green. Is there a red shape?' (the same draws: only the text changes)."""
    rng = np.random.default_rng(seed)
    def one(kind):
        scene, question, answer = (balanced_colour_present(rng) if balanced and kind == "colour_present"
                                   else scene_question_of_kind(rng, KINDS.index(kind)))
        if colours_in_prompt and kind == "colour_present": question = f"{colours_said(scene)}. {question}"
        return scene, question, reasoned(scene, answer) if reason and kind == "colour_present" else answer
    return [(*one(kinds[i % len(kinds)]), kinds[i % len(kinds)]) for i in range(n)]


def count_aware_prior(rows, knows_count: bool = True) -> float | None:
    """Loss per answer token (the word and the end token, averaged, as `loss_last`) of a guesser that knows how many shapes
    a scene has and nothing of their colours: P(yes) = 1 - (6/7)^n for "Is there a <colour> shape?" (`knows_count=False`:
    the mean of that over 1-3 shapes, the answer prior alone). None unless every row is that question answered in one
    word (the course's draws, not --balanced or --reason)."""
    if not rows or any(kind != "colour_present" or answer not in ("yes", "no") for _, _, answer, kind in rows): return None
    p_yes = lambda n: 1 - (1 - 1 / len(COLOURS)) ** n
    p = (lambda n: p_yes(n)) if knows_count else (lambda n: np.mean([p_yes(k) for k in (1, 2, 3)]))
    nll = [-np.log(p(len(s["objects"])) if a == "yes" else 1 - p(len(s["objects"]))) for s, _, a, _ in rows]
    return round(float(np.mean(nll)) / 2, 4)


IMAGES = ("scene", "blank", "none")  # what the decoder sees: the scene's tokens, its background's alone, no image tokens


def make_batch(rows, tok: TextTokenizer, oracle: Oracle, device="cpu", image: str = "scene") -> dict:
    ids, labels = zip(*(chat_ids(tok, q, a, 64) for _, q, a, _ in rows))
    input_ids, mask = pad_ids(ids, tok.pad_id)
    batch = dict(input_ids=input_ids, attention_mask=mask, labels=pad_ids(labels, IGNORE_INDEX)[0],
                 image=torch.stack([oracle.tokens(s if image == "scene" else {**s, "objects": []}) for s, *_ in rows]))
    return {k: v.to(device) for k, v in batch.items()}


def forward(model: R1Model, batch: dict, with_image: bool = True):
    "The model's forward with the oracle tokens in place of the vision encoder's (`with_image=False`: none, text alone)."
    B, D = batch["input_ids"].shape[0], model.cfg.d_model
    dev = batch["image"].device
    tokens = batch["image"] if with_image else batch["image"][:, :0]
    registers = getattr(model.inputs, "registers", None)
    if registers is not None:  # learned tokens after the patches: somewhere to look when nothing matches
        tokens = torch.cat([tokens, registers.expand(B, -1, -1)], 1)
    image = EncoderOutput(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=dev), batch["image"].mean(1) * with_image)
    audio = EncoderOutput(torch.zeros(B, 0, D, device=dev), torch.zeros(B, 0, dtype=torch.bool, device=dev), torch.zeros(B, D, device=dev))
    model.encode_prefix = lambda _: (image, audio)
    return model(batch)


def block_text_image(model: R1Model):
    "Text and image tokens may not attend to each other (the decoder mask's `blocked` pair): does looking at them cost?"
    inputs = model.inputs
    inputs.forward = lambda *a: type(inputs).forward(inputs, *a, blocked={("image", "text")})


def final_word(response: str) -> str:
    "The answer a response ends with: 'Red and blue, so no.' -> 'no'; a one-word answer is itself."
    return response.rstrip(".").split()[-1]


def score(model: R1Model, rows, tok, oracle, batch_size: int = 100, device="cpu", image: str = "scene") -> dict:
    """Per kind: the share of answers whose every token is the teacher-forced argmax (what greedy decoding would write).
    Where some answers are reasoned (several words), also `final_word`: the share whose last word before the full stop is
    the argmax after the right reasoning (the answer given a right list; the first measure is the one that counts)."""
    model.eval()
    right, last_right = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = make_batch(rows[i:i + batch_size], tok, oracle, device, image)
            out = forward(model, batch, image != "none")
            labels = batch["labels"][:, 1:]
            hit = (out.logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE_INDEX)
            right += hit.all(1).tolist()
            ends = (labels != IGNORE_INDEX).long().cumsum(1).argmax(1)  # each row's last target (eos)
            back = torch.tensor([2 if len(row[2].split()) > 1 else 1 for row in rows[i:i + batch_size]], device=ends.device)
            last_right += hit[torch.arange(len(ends)), ends - back].tolist()  # eos, then '.' and the word (or the word alone)
    model.train()
    kinds = [k for k in KINDS if any(row[3] == k for row in rows)]
    mean_of = lambda flags, k: round(float(np.mean([f for f, row in zip(flags, rows) if row[3] == k])), 3)
    result = dict(accuracy=round(float(np.mean(right)), 4), by_kind={k: mean_of(right, k) for k in kinds})
    if any(len(row[2].split()) > 1 for row in rows):
        result["final_word_by_kind"] = {k: mean_of(last_right, k) for k in kinds}
    return result


def run_arm(name: str, preset: str, steps: int, batch_size: int, image_size: int, val, tok, kinds=KINDS, device="cpu",
            wording: dict | None = None, image: str = "scene", blocked: bool = False, min_lr_ratio: float | None = None) -> dict:
    "Train arm `name` on `kinds` (`wording`: the options of `questions`), score it on `val`; `image`: one of IMAGES."
    cfg = get_preset(preset)
    cfg.model.image_size = image_size
    change = ARMS[name]
    m = cfg.model
    m.expert_dropout = change.get("expert_dropout", cfg.stages["sft"].options.expert_dropout or 0.0)
    m.n_layers, m.n_heads = change.get("n_layers", m.n_layers), change.get("n_heads", m.n_heads)
    if "n_dense_layers" in change: m.n_dense_layers = m.n_layers
    m.qk_norm = change.get("qk_norm", False)  # QK-norm in the decoder's attention (03_layers)
    torch.manual_seed(0)
    model = R1Model(m).to(device)
    if blocked: block_text_image(model)
    if change.get("registers"):  # under `inputs`, so the optimiser below takes it
        model.inputs.registers = torch.nn.Parameter(torch.randn(1, change["registers"], m.d_model, device=device))
    params = [p for n, p in model.named_parameters() if n.split(".")[0] in ("inputs", "blocks", "norm", "lm_head")]
    assert not change.get("registers") or any(p is model.inputs.registers for p in params)
    lr = change.get("lr", cfg.stages["sft"].lr)
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
    warmup = max(min(cfg.train.warmup_steps, steps // 10), 1)
    floor = cfg.train.min_lr_ratio if min_lr_ratio is None else min_lr_ratio  # 1.0: constant lr after the warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup, steps, floor))
    oracle = Oracle(m.d_model, m.image_size // m.patch_size)
    train = questions(steps * batch_size, seed=1, kinds=kinds, **(wording or {}))  # fresh scenes every step: no question is seen twice
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        batch = make_batch(train[step * batch_size:(step + 1) * batch_size], tok, oracle, device, image)
        out = forward(model, batch, image != "none")
        loss_sum, answers = answer_loss_sum(out.logits, batch["labels"])  # stage 3's loss: each answer weighs the same
        loss = loss_sum / answers
        total = loss + m.balance_weight * out.balance + m.z_weight * out.z
        opt.zero_grad(); total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
        opt.step(); sched.step()
        losses.append(round(loss.item(), 4))
        if (step + 1) % max(steps // 10, 1) == 0:  # progress, so a run cut short by a time limit still says where it was
            print(f"{name} step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - t0:.0f} s", flush=True)
    result = dict(steps=steps, batch_size=batch_size, image=image, text_image_attention=not blocked, lr=lr, min_lr_ratio=floor,
                  expert_dropout=m.expert_dropout, n_layers=m.n_layers, n_heads=m.n_heads, registers=change.get("registers", 0),
                  dense=m.n_dense_layers == m.n_layers, seconds=round(time.perf_counter() - t0, 1),
                  loss_first=losses[0], loss_last=float(np.mean(losses[-20:])), loss_curve=losses[:: max(steps // 40, 1)],
                  count_aware_prior_last=count_aware_prior(train[-20 * batch_size:]),  # on the batches loss_last averages
                  answer_prior_last=count_aware_prior(train[-20 * batch_size:], knows_count=False),
                  val=score(model, val, tok, oracle, device=device, image=image),
                  train=score(model, train[-600:], tok, oracle, device=device, image=image))
    print(name, json.dumps({k: result[k] for k in ("seconds", "loss_last", "val")}), flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64, help="sets the patch grid (64 px / 8 px patches: small's 8x8)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="train and score only these questions")
    p.add_argument("--balanced", action="store_true", help="'Is there a <colour> shape?' answered yes half of the time")
    p.add_argument("--reason", action="store_true", help="'Is there a <colour> shape?' answered after naming every colour")
    p.add_argument("--colours-in-prompt", action="store_true",
                   help="'Is there a <colour> shape?' asked after the scene's colours: 'red, pink and green. Is there a red shape?'")
    p.add_argument("--image", default="scene", choices=IMAGES, help="the decoder's image tokens: the scene's (default), "
                   "the background's alone (blank: as many tokens, none of the objects), or none (the text alone)")
    p.add_argument("--blocked", action="store_true", help="text and image tokens may not attend to each other")
    p.add_argument("--min-lr-ratio", type=float, help="where the cosine ends, times the peak lr (default: the preset's; 1.0: constant)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="research/2026-12-03-small-visual-qa/decoder_reading_cpu.json")
    args = p.parse_args()
    if args.min_lr_ratio is not None and not 0 <= args.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.threads: torch.set_num_threads(args.threads)
    tok = TextTokenizer.from_file("data_samples/tokenizer.json")
    wording = dict(balanced=args.balanced, reason=args.reason, colours_in_prompt=args.colours_in_prompt)
    val = questions(600, seed=2, kinds=tuple(args.kinds), **wording)
    asked = lambda q: q.rsplit(". ", 1)[-1]  # the question without the colours --colours-in-prompt puts before it
    blind = {k: round(blind_accuracy([asked(q) for _, q, _, kk in val if kk == k], [final_word(a) for _, _, a, kk in val if kk == k]), 3)
             for k in args.kinds}
    flag = lambda k, v: f"--{k.replace('_', '-')}" + ("" if v is True else " " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
    result = dict(command="python research/2026-12-03-small-visual-qa/decoder_reading.py " + " ".join(flag(k, v) for k, v in vars(args).items() if k != "out" and v),
                  what=__doc__.split("\n\n")[2], preset=args.preset, val_questions=len(val),
                  blind=dict(accuracy=round(blind_accuracy([asked(q) for _, q, _, _ in val], [final_word(a) for _, _, a, _ in val]), 4), by_kind=blind),
                  device=args.device, threads=torch.get_num_threads(), arms={})
    for arm in args.arms:
        result["arms"][arm] = run_arm(arm, args.preset, args.steps, args.batch_size, args.image_size, val, tok, tuple(args.kinds),
                                       args.device, wording, args.image, args.blocked, args.min_lr_ratio)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
