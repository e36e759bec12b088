"""Helper for test_distributed.py: stage 3 of the tiny model on fixed real batches, stopped and resumed across
world sizes and strategies.

Usage: resume_train.py ROOT RUN_DIR STOP_AT [ddp | fsdp]

Every process reads the same 8 global micro-batches of 4 samples, two per step; rank r of W takes the ones whose
index is r modulo W (one process takes both, accumulating). `GlobalBatches` remembers the steps it has served, so a
run resumed at another world size continues at the right micro-batch. The run trains to step 4 or stops (with a
checkpoint) after STOP_AT, resuming from RUN_DIR's latest checkpoint if there is one, and writes
RUN_DIR/losses{rank}.json: the step losses it trained.
"""
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from r1_scratch.config import apply_overrides, get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.distributed import wrap_model
from r1_scratch.model import R1Model, count_targets
from r1_scratch.runtime import init_distributed, shutdown
from r1_scratch.trainer import Stage, Trainer, lm_loss

warnings.simplefilter("ignore")  # FSDP in one CPU process warns that it shards nothing: that is the point here
root, run_dir, stop_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
strategy = sys.argv[4] if len(sys.argv) > 4 else "ddp"
os.environ["R1_NO_PROGRESS"] = "1"
cfg = apply_overrides(with_data_root(get_preset("tiny"), root), ["train.wandb=disabled", "train.ckpt_every=0",
                      "train.warmup_steps=1", f"dist.strategy={strategy}"])
saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}  # the loader would split by rank
batches = [b for _, b in zip(range(8), build_loader(cfg, "train", {"instruct": 0.5, "vqa": 0.5}, batch_size=4))]
os.environ.update(saved)


class GlobalBatches:
    "This rank's share of each step's two micro-batches, resumable by global step at any world size."
    def __init__(self, rank: int, world: int): self.rank, self.world, self.steps = rank, world, 0
    def __iter__(self):
        while True:
            mine = [batches[i] for i in range(2 * self.steps, 2 * self.steps + 2) if i % self.world == self.rank]
            for i, batch in enumerate(mine):
                self.steps += i == len(mine) - 1  # before the step's last micro-batch: a checkpoint follows it
                yield batch
    def state_dict(self): return {"steps": self.steps}
    def load_state_dict(self, state): self.steps = state["steps"]


rt = init_distributed("fp32")
torch.manual_seed(0)
model = wrap_model(R1Model(cfg.model), cfg, rt)
stage = Stage("sft", GlobalBatches(rt.rank, rt.world), lm_loss, count_targets, steps=4, lr=1e-3,
              grad_accum=2 // rt.world)
trainer = Trainer(model, stage, cfg, run_dir, rt, callbacks=[])
trainer.fit(resume=True, stop_at=stop_at)
(run_dir / f"losses{rt.rank}.json").write_text(json.dumps({h["step"]: h["loss"] for h in trainer.history}))
shutdown(rt)
