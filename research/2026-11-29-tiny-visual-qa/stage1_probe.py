"""What stage 1 (the article's masked reconstruction) leaves in the vision encoder, on the tiny preset, CPU.

    python research/2026-11-29-tiny-visual-qa/stage1_probe.py [--out research/2026-11-29-tiny-visual-qa/stage1_probe_cpu.json]

Trains the article's stage 1 (all four objectives, one modality per batch, 100 steps at lr 2e-3, as the tiny
launch ran it before its stage 1 went decoder-only), then teaches the vision encoder plus a linear head to
classify the handwritten digits for 200 steps, starting from (a) a fresh encoder, (b) the one stage 1 left,
(c) that one with its transformer blocks reset; and reports the validation accuracy of each: the numbers of
notebook 13's section "What stage 1 does to the encoders at a short budget". About a minute on 2 cores.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1_scratch.config import apply_overrides, default_stages, get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.model import R1Model
from r1_scratch.pretrain import pretrain_stage
from r1_scratch.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def digit_accuracy(model: R1Model, cfg, steps: int = 200) -> float:
    "Validation accuracy of the vision encoder + a linear head after `steps` supervised steps on the train digits."
    torch.manual_seed(0)
    head = torch.nn.Linear(cfg.model.fusion_dim, 10)
    opt = torch.optim.AdamW([*model.encoders.parameters(), *head.parameters()], lr=1e-3)
    labels = lambda b: torch.tensor([int(l) for l in b["label"]])
    for _, b in zip(range(steps), build_loader(cfg, "train", {"digits": 1.0}, batch_size=32)):
        loss = F.cross_entropy(head(model.encoders(b).image.float() * 10), labels(b))
        opt.zero_grad(); loss.backward(); opt.step()
    correct = n = 0
    with torch.no_grad():
        for b in build_loader(cfg, "val", {"digits": 1.0}, batch_size=64, num_workers=0):
            correct += (head(model.encoders(b).image.float() * 10).argmax(-1) == labels(b)).sum().item(); n += len(b["label"])
    return round(correct / n, 4)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="research/2026-11-29-tiny-visual-qa/stage1_probe_cpu.json")
    args = p.parse_args()
    os.environ["R1_NO_PROGRESS"] = "1"
    torch.set_num_threads(2)
    cfg = with_data_root(apply_overrides(get_preset("tiny"), ["train.wandb=disabled", "train.ckpt_every=0"]), REPO)
    cfg.stages["pretrain"] = default_stages()["pretrain"]          # the article's stage 1
    st = cfg.stages["pretrain"]
    st.steps, st.batch_size, st.lr = 100, 16, 2e-3                     # as the tiny launch ran it before
    t0 = time.perf_counter()
    torch.manual_seed(0)
    fresh = R1Model(cfg.model)
    initial = {k: v.clone() for k, v in fresh.state_dict().items()}
    pretrained = R1Model(cfg.model)
    pretrained.load_state_dict(initial)
    Trainer(pretrained, pretrain_stage(cfg, evaluate=None), cfg, Path(tempfile.mkdtemp()), callbacks=[]).fit()
    reset = R1Model(cfg.model)
    reset.load_state_dict({k: initial[k] if k.startswith("encoders.vision.blocks") else v
                           for k, v in pretrained.state_dict().items()})
    result = dict(command="python research/2026-11-29-tiny-visual-qa/stage1_probe.py", preset="tiny", stage1_steps=100, probe_steps=200,
                  digit_val_accuracy={"fresh encoder": digit_accuracy(fresh, cfg),
                                      "after stage 1": digit_accuracy(pretrained, cfg),
                                      "after stage 1, blocks reset": digit_accuracy(reset, cfg)},
                  seconds=round(time.perf_counter() - t0, 1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
