"""Stage 3 of a tiny run again, from its stage-2 checkpoint, under a few settings: does anything within tiny's
budget lift its answers above the blind bar? CPU, ~4.5 min per 400-step variant.

    python research/2026-11-29-tiny-visual-qa/tiny_sft_variants.py [--run runs/tiny] [--out research/2026-11-29-tiny-visual-qa/tiny_sft_variants_cpu.json] [--only NAME ...]

Each variant loads the same stage-2 checkpoint (`--run`, the main job's output by default), applies its overrides
to the run's own config, trains stage 3 from the same seed, and scores visual and audio QA per kind of question
on the val split, and visual QA on the train split it was tuned on (can it fit what it saw?). The default variant
is the launch's own stage 3, so its numbers repeat the launch's report. "visual QA only" asks whether the decoder
can learn to read images at all when every answer is a visual one; "vision encoder trained" lets stage 3 tune
the vision encoder too (which `15_stage3_sft` shows can undo stage 2's retrieval).
"""
import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from r1_scratch.config import apply_overrides, config_from_dict
from r1_scratch.launch import find_checkpoint
from r1_scratch.model import R1Model
from r1_scratch.sft import answer_accuracy, sft_stage
from r1_scratch.trainer import Checkpoints, Trainer

VARIANTS = {
    "default (400 steps)": [],
    "800 steps": ["stages.sft.steps=800"],
    "no expert dropout": ["stages.sft.options.expert_dropout=0"],
    "QA-heavy mixture": ["stages.sft.mixture={instruct: 0.3, reasoning: 0.1, vqa: 0.4, audio_qa: 0.2}"],
    "visual QA only": ["stages.sft.mixture={vqa: 1.0}"],
    "vision encoder trained": ["stages.sft.trainable=[inputs, blocks, norm, lm_head, encoders.vision]"],
    "lr 3e-4": ["stages.sft.lr=3e-4"],
    "visual QA only, lr 3e-4": ["stages.sft.mixture={vqa: 1.0}", "stages.sft.lr=3e-4"],
}


def scores(model, cfg, split: str, source: str) -> dict:
    "Answer accuracy, blind bar and accuracy per kind of `source`'s questions in `split`."
    split_cfg = copy.deepcopy(cfg); split_cfg.data.val = getattr(cfg.data, split)  # answer_accuracy reads data.val
    r = answer_accuracy(model, split_cfg, source, max_samples=200)
    return dict(accuracy=r["accuracy"], blind=r["blind"], samples=r["samples"],
                by_kind={k: v["accuracy"] for k, v in r["by_kind"].items()})


def run_variant(align_ckpt: Path, overrides: list[str]) -> dict:
    "Stage 3 from `align_ckpt` under `overrides`; its scores and training time."
    cfg = apply_overrides(config_from_dict(json.loads((align_ckpt / "meta.json").read_text())["config"]), overrides)
    torch.manual_seed(cfg.train.seed)
    model = R1Model(cfg.model); Checkpoints(align_ckpt.parent).load(align_ckpt, model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        Trainer(model, sft_stage(cfg, evaluate=None), cfg, out, callbacks=[]).fit(resume=False)
    seconds = round(time.perf_counter() - t0, 1)
    model.eval()
    return dict(overrides=overrides, train_seconds=seconds, val_vqa=scores(model, cfg, "val", "vqa"),
                val_audio_qa=scores(model, cfg, "val", "audio_qa"), train_vqa=scores(model, cfg, "train", "vqa"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/tiny", help="a tiny run with a stage-2 checkpoint")
    p.add_argument("--out", default="research/2026-11-29-tiny-visual-qa/tiny_sft_variants_cpu.json")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = p.parse_args()
    os.environ.setdefault("R1_NO_PROGRESS", "1")
    torch.set_num_threads(2)
    align = find_checkpoint(Path(args.run) / "align")
    names = args.only or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown: raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    result = dict(command="python research/2026-11-29-tiny-visual-qa/tiny_sft_variants.py" + (f" --run {args.run}" if args.run != "runs/tiny" else ""),
                  checkpoint=str(align), variants={})
    for name in names:
        result["variants"][name] = run_variant(align, VARIANTS[name])
        Path(args.out).write_text(json.dumps(result, indent=1))  # after each variant: a long run keeps what it has
        print(name, json.dumps(result["variants"][name]), flush=True)


if __name__ == "__main__":
    main()
