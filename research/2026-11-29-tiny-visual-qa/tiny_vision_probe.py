"""Can the tiny preset's vision encoder see what visual QA asks about, and does its decoder read it? CPU, ~5 min.

    python research/2026-11-29-tiny-visual-qa/tiny_vision_probe.py [--run runs/tiny] [--out research/2026-11-29-tiny-visual-qa/tiny_vision_probe_cpu.json]

Why: the tiny launch's visual QA stays near the blind guesser, and "what shape is ..." is answered right almost
never, also when stage 3 sees nothing but QA. Two measurements on scenes of one shape drawn by the course's own
generator (`samples.random_scene`, rendered and decoded exactly as the loader does):

1. Supervised: a fresh vision encoder plus a linear head learns to name the shape (6 classes) for 300 steps, at
   the tiny preset's 32 px and at 64 px (same 8 px patches), with the validation accuracy for small and large
   shapes; and, as the reference that shows the shape is visible at 32 px, a three-layer CNN trained the same way.
   Each is read out two ways: the mean over the image (how stage 2 read the encoder until `model.image_pool`
   became "max") and the max. A lone shape covers a few percent of the image, and the mean dilutes it. The ViT
   also runs with `model.patch_stem="conv"` (3x3 stride-2 convolutions instead of one Linear per patch), at both
   sizes.
2. Frozen: a logistic-regression probe of colour, shape, size and position on the features (mean of the token
   features and the pooled vector) of the vision encoder that stage 2 of a tiny run left (`--run`, the main job's
   output by default; skipped if it has no stage-2 checkpoint), against a fresh encoder and the majority class.
3. Decoder: what the run's stage-2 encoder knows of the handwritten digits (a logistic-regression probe on 100 and
   on all 400 train digits, scored on the val digits), next to what its stage-3 model answers to "What digit is
   this?" and the other visual questions, per kind, on the val split and on the train split it was tuned on.
"""
import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from r1_scratch.config import apply_overrides, config_from_dict, get_preset
from r1_scratch.data import DecodeSpec, SkipCounter, decode_image, decode_record, expand_shards, read_source
from r1_scratch.launch import find_checkpoint
from r1_scratch.model import R1Model
from r1_scratch.samples import SHAPES, png_bytes, random_scene, render_scene
from r1_scratch.trainer import CheckpointError, Checkpoints

ATTRIBUTES = ("colour", "shape", "size", "position")


def single_shapes(n: int, seed: int, size: int) -> tuple[torch.Tensor, list[dict]]:
    "`n` one-shape scenes as the loader gives them at `size` px, with each shape's attributes."
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, 1, 1) for _ in range(n)]
    images = torch.stack([decode_image(png_bytes(render_scene(s)), size) for s in scenes])
    return images, [s["objects"][0] for s in scenes]


def readout(out) -> torch.Tensor:
    "An EncoderOutput's mean token feature and pooled vector, side by side."
    return torch.cat([out.tokens.mean(1), out.pooled], 1)


def encode(model: R1Model, images: torch.Tensor) -> torch.Tensor:
    return readout(model.encoders.vision(images, torch.ones(len(images), dtype=torch.bool)))


def small_cnn(classes: int, pool: str = "max") -> torch.nn.Module:
    "Three 3x3 convolutions, a global max (or mean) and a linear head: the locality prior a ViT's patches lack."
    conv = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.GELU()]
    pooling = torch.nn.AdaptiveMaxPool2d(1) if pool == "max" else torch.nn.AdaptiveAvgPool2d(1)
    return torch.nn.Sequential(*conv(3, 32), *conv(32, 64), *conv(64, 64), pooling, torch.nn.Flatten(),
                               torch.nn.Linear(64, classes))


def shape_accuracy(image_size: int, backbone: str = "vit", pool: str = "mean", steps: int = 300, batch: int = 64,
                   stem: str = "linear") -> dict:
    """Validation accuracy (all, small, large shapes) of a fresh `backbone` ("vit": the tiny vision encoder with
    patches embedded by `stem`, or "cnn") + linear head trained to name the shape, its features pooled over the
    image by `pool` (mean or max)."""
    cfg = apply_overrides(get_preset("tiny"), [f"model.image_size={image_size}", f"model.image_pool={pool}",
                                               f"model.patch_stem={stem}"])
    torch.manual_seed(0)
    if backbone == "vit":
        vision = R1Model(cfg.model).encoders.vision
        head = torch.nn.Linear(cfg.model.d_model, len(SHAPES))
        net = lambda x: head(vision(x).pooled)  # what stage 2 compares with a caption
        params = [*vision.parameters(), *head.parameters()]
    else:
        net = small_cnn(len(SHAPES), pool); params = list(net.parameters())
    train_x, train_o = single_shapes(steps * batch // 4, 1, image_size)  # each image seen ~4 times
    val_x, val_o = single_shapes(600, 2, image_size)
    label = lambda objects: torch.tensor([SHAPES.index(o["shape"]) for o in objects])
    train_y, val_y = label(train_o), label(val_o)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(steps):
        pick = torch.randint(len(train_x), (batch,))
        loss = F.cross_entropy(net(train_x[pick]), train_y[pick])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): right = net(val_x).argmax(-1) == val_y
    small = torch.tensor([o["size"] == "small" for o in val_o])
    return dict(all=round(right.float().mean().item(), 3), small=round(right[small].float().mean().item(), 3),
                large=round(right[~small].float().mean().item(), 3), last_train_loss=round(loss.item(), 3),
                chance=round(1 / len(SHAPES), 3))


def linear_probe(features: np.ndarray, objects: list[dict], n_train: int) -> dict:
    "Validation accuracy of a logistic regression per attribute, trained on the first `n_train` rows."
    out = {}
    for attr in ATTRIBUTES:
        y = [o[attr] for o in objects]
        clf = LogisticRegression(max_iter=3000).fit(features[:n_train], y[:n_train])
        out[attr] = round(clf.score(features[n_train:], y[n_train:]), 3)
    return out


def frozen_probes(run: Path) -> dict | None:
    "Linear probes of a stage-2 encoder from `run`, a fresh one, and the majority class; None without a checkpoint."
    try: ckpt = find_checkpoint(run / "align")
    except CheckpointError: return None
    cfg = config_from_dict(json.loads((ckpt / "meta.json").read_text())["config"])
    aligned = R1Model(cfg.model); Checkpoints(ckpt.parent).load(ckpt, aligned)
    torch.manual_seed(0)
    fresh = R1Model(cfg.model)
    images, objects = single_shapes(1600, 3, cfg.model.image_size)
    n_train = 1200
    majority = {a: round(max(np.mean([o[a] == v for o in objects[n_train:]]) for v in {o[a] for o in objects}), 3)
                for a in ATTRIBUTES}
    with torch.no_grad():
        result = {name: linear_probe(encode(m.eval(), images).numpy(), objects, n_train)
                  for name, m in (("stage-2 encoder", aligned), ("fresh encoder", fresh))}
    return dict(checkpoint=str(ckpt), train=n_train, val=len(objects) - n_train, majority=majority, **result)


def load_digits(cfg, split: str) -> tuple[torch.Tensor, np.ndarray]:
    "The handwritten digits of a split of the run's data, decoded as the loader does, and their labels."
    counter, spec = SkipCounter(), DecodeSpec(cfg.model.image_size)
    shards = expand_shards(getattr(cfg.data, split).replace("{task}", "digits"))
    samples = [decode_record(raw, spec, counter, "digits") for raw in read_source("digits", shards, counter, 0, 0, 0)]
    return torch.stack([s.image for s in samples]), np.array([s.meta["label"] for s in samples])


def decoder_reads(run: Path) -> dict | None:
    "Digit probes of the run's stage-2 encoder beside its stage-3 answers per kind (val and train); None without both."
    from r1_scratch.sft import answer_accuracy
    try: align, sft = find_checkpoint(run / "align"), find_checkpoint(run / "sft")
    except CheckpointError: return None
    cfg = config_from_dict(json.loads((sft / "meta.json").read_text())["config"])
    encoder_model = R1Model(cfg.model); Checkpoints(align.parent).load(align, encoder_model)
    (train_x, train_y), (val_x, val_y) = load_digits(cfg, "train"), load_digits(cfg, "val")
    with torch.no_grad(): train_f, val_f = (encode(encoder_model.eval(), x).numpy() for x in (train_x, val_x))
    probe = {f"{n} train digits": round(LogisticRegression(max_iter=3000).fit(train_f[:n], train_y[:n]).score(val_f, val_y), 3)
             for n in (100, len(train_y))}
    model = R1Model(cfg.model); Checkpoints(sft.parent).load(sft, model); model.eval()
    answers = {}
    for split in ("val", "train"):
        split_cfg = copy.deepcopy(cfg); split_cfg.data.val = getattr(cfg.data, split)  # answer_accuracy reads data.val
        r = answer_accuracy(model, split_cfg, "vqa", max_samples=200)
        answers[split] = dict(accuracy=r["accuracy"], samples=r["samples"],
                              by_kind={k: v["accuracy"] for k, v in r["by_kind"].items()})
    return dict(checkpoints=[str(align), str(sft)], stage2_encoder_digit_probe=probe, chance=0.1,
                stage3_vqa_accuracy=answers)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/tiny", help="a tiny run whose stage-2 checkpoint is probed")
    p.add_argument("--out", default="research/2026-11-29-tiny-visual-qa/tiny_vision_probe_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    result = dict(command="python research/2026-11-29-tiny-visual-qa/tiny_vision_probe.py " + (f"--run {args.run}" if args.run != "runs/tiny" else ""),
                  shape_named_after_300_supervised_steps={
                      "tiny vision encoder, mean, 32 px": shape_accuracy(32),
                      "tiny vision encoder, mean, 64 px": shape_accuracy(64),
                      "tiny vision encoder, max, 32 px": shape_accuracy(32, pool="max"),
                      "tiny vision encoder, max, 64 px": shape_accuracy(64, pool="max"),
                      "tiny vision encoder, conv stem, max, 32 px": shape_accuracy(32, pool="max", stem="conv"),
                      "tiny vision encoder, conv stem, max, 64 px": shape_accuracy(64, pool="max", stem="conv"),
                      "small CNN, max, 32 px": shape_accuracy(32, "cnn", "max"),
                      "small CNN, mean, 32 px": shape_accuracy(32, "cnn", "mean")},
                  frozen_linear_probes=frozen_probes(Path(args.run)), decoder=decoder_reads(Path(args.run)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
