"""Where along the way does a scene's object lose its shape? Linear probes of one object at a time. CPU or GPU, ~1 min.

    python research/2026-12-03-small-visual-qa/object_probe.py --run RUN_DIR [--scenes 1500] [--out research/2026-12-03-small-visual-qa/object_probe.json]

Why: `small` answers "What colour is the star?" and "What shape is on the left?" wrongly, even on questions it was
tuned on, while its stage-2 encoder tells a caption from its shape-swapped twin for every val scene. That pooled
vector is not what the decoder reads: it reads the patch tokens. So each object of a scene is read out where the
decoder would find it, the mean of the tokens of the patches its outline touches, at each step of the way:

1. the stage-2 vision encoder's tokens (the `align` checkpoint of RUN_DIR), and a fresh encoder's as the floor;
2. the stage-3 encoder's tokens, the projector's output (what enters the decoder), and the decoder's hidden state
   at those positions after each block (the `sft` checkpoint, when there is one).

A logistic regression per attribute (shape, colour, size) is trained on the objects of two thirds of the scenes
and scored on the rest. Scenes are drawn by the course's own generator (`samples.random_scene`, 1-3 objects) and
decoded as the loader decodes them. If shape is read well from the tokens but stage 3 still misses it, the decoder
does not learn to read it; if it is not, the encoder's tokens do not carry it where the object is.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from r1_scratch.config import config_from_dict
from r1_scratch.data import decode_image
from r1_scratch.launch import find_checkpoint
from r1_scratch.model import R1Model
from r1_scratch.samples import IMAGE_SIZE, RADIUS, png_bytes, random_scene, render_scene
from r1_scratch.trainer import CheckpointError, Checkpoints

ATTRIBUTES = ("shape", "colour", "size")


def scenes_and_images(n: int, seed: int, size: int) -> tuple[list[dict], torch.Tensor]:
    "`n` scenes of 1-3 objects and their images as the loader gives them at `size` px."
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, torch.stack([decode_image(png_bytes(render_scene(s)), size) for s in scenes])


def object_patches(o: dict, grid: int) -> torch.Tensor:
    "(grid*grid,) bool: the patches that the object's bounding square (side 2.3 radii, row-major) reaches into."
    cell = IMAGE_SIZE / grid                                  # a patch's side in the scene's pixels
    start = torch.arange(grid) * cell                          # where each row / column of patches begins
    r = RADIUS[o["size"]] * 1.15                               # the pointed shapes reach a little past the radius
    near_x = (start < o["x"] + r) & (start + cell > o["x"] - r)
    near_y = (start < o["y"] + r) & (start + cell > o["y"] - r)
    return (near_y[:, None] & near_x[None, :]).flatten()


def object_features(tokens: torch.Tensor, scenes: list[dict], grid: int) -> tuple[np.ndarray, list[dict], np.ndarray]:
    "tokens (N, grid*grid, D) -> one row per object (mean of its patches), the objects, and each object's scene index."
    rows, objects, scene_of = [], [], []
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            rows.append(tokens[i, object_patches(o, grid)].float().mean(0)); objects.append(o); scene_of.append(i)
    return torch.stack(rows).cpu().numpy(), objects, np.array(scene_of)


def probe(features: np.ndarray, objects: list[dict], scene_of: np.ndarray, n_train_scenes: int) -> dict:
    "Validation accuracy of a logistic regression per attribute; train and val objects come from different scenes."
    train = scene_of < n_train_scenes
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6  # one scale for all layers' features
    x = (features - mean) / std
    out = {}
    for attr in ATTRIBUTES:
        y = np.array([o[attr] for o in objects])
        clf = LogisticRegression(max_iter=2000, C=0.5).fit(x[train], y[train])
        out[attr] = round(float(clf.score(x[~train], y[~train])), 3)
    return out


def load(ckpt: Path, device) -> tuple[R1Model, object]:
    cfg = config_from_dict(json.loads((ckpt / "meta.json").read_text())["config"])
    model = R1Model(cfg.model); Checkpoints(ckpt.parent).load(ckpt, model)
    return model.to(device).eval(), cfg


@torch.no_grad()
def encoder_tokens(model: R1Model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    dev = next(model.parameters()).device
    outs = [model.encoders.vision(x.to(dev), torch.ones(len(x), dtype=torch.bool, device=dev)).tokens
            for x in images.split(batch)]
    return torch.cat(outs)


@torch.no_grad()
def decoder_streams(model: R1Model, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    "The projector's output and each decoder block's output at the image positions (a one-token text after them)."
    dev = next(model.parameters()).device
    n_img = model.cfg.n_patches
    captured: dict[str, list] = {"projector": []}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: captured.setdefault(f"decoder block {i + 1}", []).append(
        out[0][:, :n_img].float().cpu())) for i, b in enumerate(model.blocks)]
    try:
        for x in images.split(batch):
            B = len(x)
            b = {"images": x.to(dev), "has_image": torch.ones(B, dtype=torch.bool, device=dev),
                 "audio": torch.zeros(B, 1, device=dev), "audio_lengths": torch.zeros(B, dtype=torch.long, device=dev),
                 "input_ids": torch.ones(B, 1, dtype=torch.long, device=dev),
                 "attention_mask": torch.ones(B, 1, dtype=torch.long, device=dev)}
            image, _ = model.encode_prefix(b)
            captured["projector"].append(model.inputs.project["image"](image.tokens).float().cpu())
            model(b)
    finally:
        for h in hooks: h.remove()
    return {k: torch.cat(v) for k, v in captured.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run directory with align/ (and sft/) checkpoints")
    p.add_argument("--scenes", type=int, default=1500)
    p.add_argument("--out", default="research/2026-12-03-small-visual-qa/object_probe.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Path(args.run)
    align = find_checkpoint(run / "align")
    aligned, cfg = load(align, device)
    grid = cfg.model.image_size // cfg.model.patch_size
    scenes, images = scenes_and_images(args.scenes, 7, cfg.model.image_size)
    n_train = args.scenes * 2 // 3
    streams = {"stage-2 encoder": encoder_tokens(aligned, images)}
    torch.manual_seed(0)
    streams["fresh encoder"] = encoder_tokens(R1Model(cfg.model).to(device).eval(), images)
    sources = [str(align)]
    try: sft = find_checkpoint(run / "sft")
    except CheckpointError: sft = None  # a run that stopped after stage 2: its encoder alone
    if sft is not None:
        tuned, _ = load(sft, device)
        streams["stage-3 encoder"] = encoder_tokens(tuned, images)
        streams |= {f"stage-3 {k}": v for k, v in decoder_streams(tuned, images).items()}
        sources.append(str(sft))
    objects = None
    result = {}
    for name, tokens in streams.items():
        features, objects, scene_of = object_features(tokens, scenes, grid)
        result[name] = probe(features, objects, scene_of, n_train)
        print(name, result[name], flush=True)
    majority = {a: round(max(np.mean([o[a] == v for o in objects]) for v in {o[a] for o in objects}), 3) for a in ATTRIBUTES}
    out = dict(command=f"python research/2026-12-03-small-visual-qa/object_probe.py --run {args.run}", checkpoints=sources, scenes=args.scenes,
               objects=len(objects), train_scenes=n_train, majority=majority, probes=result,
               seconds=round(time.perf_counter() - t0, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
