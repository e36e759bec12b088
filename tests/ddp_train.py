"""Helper for test_distributed.py: a few steps of the tiny model on fixed real batches, as DDP ranks or one process.

Rank r of W takes micro-batches r, r + W, ...; one process takes them all with accumulation W, so both see the
same global batch in every step. Prints one JSON line per rank: the step losses and a checksum of the weights.
"""
import json
import os
import sys

import torch

from r1_scratch.config import apply_overrides, get_preset
from r1_scratch.data import build_loader
from r1_scratch.distributed import init_distributed, shutdown, wrap_ddp
from r1_scratch.model import R1Model, count_targets
from r1_scratch.trainer import Stage, Trainer, lm_loss

root, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.environ["R1_NO_PROGRESS"] = "1"
cfg = apply_overrides(get_preset("tiny"), ["train.wandb=disabled", "train.ckpt_every=0", "train.warmup_steps=1",
                                           "train.lr=1e-3", f"data.train={root}/data_samples/train/{{task}}-{{000000..000003}}.tar",
                                           f"data.tokenizer={root}/data_samples/tokenizer.json"])
world = int(os.environ.get("WORLD_SIZE", "1"))
# every process reads the same batches before the process group exists (no rank split): the global batches
saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}  # the loader would split by rank
batches = [b for _, b in zip(range(2 * steps), build_loader(cfg, "train", {"instruct": 0.5, "vqa": 0.5}, batch_size=4))]
os.environ.update(saved)
rt = init_distributed("fp32")
torch.manual_seed(0)
model = R1Model(cfg.model)
mine = batches[rt.rank::rt.world]
stage = Stage("sft", mine, lm_loss, count_targets, steps=steps, lr=1e-3, grad_accum=2 // rt.world)  # a list is a loader
trainer = Trainer(wrap_ddp(model, rt), stage, cfg, out_dir, rt, callbacks=[])
trainer.fit(resume=False)
weights = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
print(json.dumps(dict(rank=rt.rank, world=rt.world, losses=[h["loss"] for h in trainer.history],
                      checksum=weights.sum().item(), norm=weights.norm().item())), flush=True)
shutdown(rt)
