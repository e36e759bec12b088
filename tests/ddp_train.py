"""Helper for test_launch.py: a few steps of the tiny model on fixed real batches, as DDP ranks or one process.

Usage: ddp_train.py ROOT OUT_DIR STEPS [sft | align | align_hard | pretrain] [ddp | fsdp] [none | full | selective]

sft and pretrain: rank r of W takes micro-batches r, r + W, ...; one process takes them all with accumulation W,
so both see the same global batch in every step (pretrain: one modality per micro-batch, the ranks' modalities
differ within a step). align: each rank takes an unequal share of the rows of every global batch (3 and 5 of 8),
one process takes whole batches, so contrastive negatives must come from both ranks to match. align_hard: the
same with hard negatives that swap the background ("dark" <-> "light"): a caption names it at most once and the
group has two words, so the swap does not depend on the random draws, and the ranks hold unequal numbers of them.
Each rank writes OUT_DIR/rank{r}.json (a file, not stdout: two ranks' prints can interleave on one line):
the step losses and a checksum of the weights. The strategy (DDP by default, or FSDP2) and the activation
checkpointing are the config's dist.strategy and train.activation_checkpointing, applied by wrap_model.
"""
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from r1_scratch.config import apply_overrides, get_preset
from r1_scratch.data import build_loader
from r1_scratch.distributed import wrap_model
from r1_scratch.runtime import init_distributed, shutdown
from r1_scratch.model import R1Model, count_targets
from r1_scratch.trainer import Stage, Trainer, lm_loss
from r1_scratch.align import align_loss, count_pairs, swap_one_word, word_swaps
from r1_scratch.data import TextTokenizer
from r1_scratch.pretrain import batch_modality, one_per_batch, pretrain_loss
from r1_scratch.sft import select_rows

root, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind = sys.argv[4] if len(sys.argv) > 4 else "sft"
strategy = sys.argv[5] if len(sys.argv) > 5 else "ddp"
checkpointing = sys.argv[6] if len(sys.argv) > 6 else "none"
os.environ["R1_NO_PROGRESS"] = "1"
cfg = apply_overrides(get_preset("tiny"), ["train.wandb=disabled", "train.ckpt_every=0", "train.warmup_steps=1",
                                           "train.lr=1e-3", f"data.train={root}/data_samples/train/{{task}}-{{000000..000003}}.tar",
                                           f"data.tokenizer={root}/data_samples/tokenizer.json",
                                           f"dist.strategy={strategy}", f"train.activation_checkpointing={checkpointing}"])
world = int(os.environ.get("WORLD_SIZE", "1"))
# every process reads the same batches before the process group exists (no rank split): the global batches
saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}  # the loader would split by rank

def modality_batches(n: int) -> list[dict]:
    "n one-modality batches in the order text, audio, image, text, ...: the two ranks see different modalities."
    loader = build_loader(cfg, "train", {"text": 0.4, "scenes": 0.3, "speech": 0.3}, batch_size=4, one_source_per_batch=True)
    by_kind = {}
    for batch in loader:
        by_kind.setdefault(batch_modality(batch), []).append(batch)
        if all(len(by_kind.get(k, [])) >= n for k in ("text", "audio", "image")): break
    order = ["text", "audio", "image"]
    return [by_kind[order[i % 3]].pop() for i in range(n)]

if kind.startswith("align"):
    batches = [b for _, b in zip(range(steps), build_loader(cfg, "train", {"scenes": 0.5, "speech": 0.5}, batch_size=8))]
elif kind == "pretrain":
    batches = modality_batches(2 * steps)
else:
    batches = [b for _, b in zip(range(2 * steps), build_loader(cfg, "train", {"instruct": 0.5, "vqa": 0.5}, batch_size=4))]
os.environ.update(saved)
rt = init_distributed("fp32")
torch.manual_seed(0)
model = R1Model(cfg.model)
if kind.startswith("align"):
    mine = batches if rt.world == 1 else [select_rows(b, [[0, 1, 2], [3, 4, 5, 6, 7]][rt.rank]) for b in batches]
    swaps = word_swaps(TextTokenizer.from_file(cfg.data.tokenizer), [["dark", "light"]]) if kind == "align_hard" else None
    stage = Stage("align", mine, partial(align_loss, swaps=swaps), count_pairs, steps=steps, lr=1e-3,
                  trainable=["encoders", "heads.logit_scale"])
elif kind == "pretrain":
    tok = TextTokenizer.from_file(cfg.data.tokenizer)
    stage = Stage("pretrain", batches[rt.rank::rt.world], lambda m, b: pretrain_loss(m, b, tok), one_per_batch,
                  steps=steps, lr=1e-3, grad_accum=2 // rt.world)
else:
    stage = Stage("sft", batches[rt.rank::rt.world], lm_loss, count_targets, steps=steps, lr=1e-3, grad_accum=2 // rt.world)
trainer = Trainer(wrap_model(model, cfg, rt), stage, cfg, out_dir, rt, callbacks=[])
trainer.fit(resume=False)
whole = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # an FSDP shard -> the whole weight
weights = torch.cat([whole(p.detach()).flatten() for p in model.parameters()]).double()
result = dict(rank=rt.rank, world=rt.world, losses=[h["loss"] for h in trainer.history],
              checksum=weights.sum().item(), norm=weights.norm().item())
if kind == "align_hard":  # how many hard negatives this rank held in each step
    result["hard_rows"] = [int(swap_one_word(b["text_ids"], b["text_mask"], swaps)[1].sum()) for b in mine[:steps]]
Path(out_dir).mkdir(parents=True, exist_ok=True)
(Path(out_dir) / f"rank{rt.rank}.json").write_text(json.dumps(result))
shutdown(rt)
