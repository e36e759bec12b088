"""How many times does dynamo compile each block kind of a real stage-3 run, and does it hit its recompile limit?

Dynamo's guards, not the backend, decide recompiles, so the CPU answers for the GPU: `compile_blocks` with the
`aot_eager` backend (no code generation) on a preset's stage-3 micro-batches from the real loader, counting the
compiled versions of each block class's `forward` and the frames dynamo gave up on, at dynamo's default limit (8)
and at the limit `compile_blocks` sets now (64).

    python research/2026-12-06-compile-recompiles/recompiles.py [--preset small] [--batches 24]
"""
import argparse
import itertools
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from r1_scratch.data import build_loader
from r1_scratch.distributed import all_blocks, compile_blocks, shard_model
from r1_scratch.launch import resolve_config
from r1_scratch.model import R1Model
from r1_scratch.trainer import Trainer, lm_stage
from r1_scratch.runtime import local_runtime


class LimitHits(logging.Handler):
    "Counts dynamo's warnings that a code object hit the recompile limit (it then runs eager), by function."
    def __init__(self):
        super().__init__()
        self.hits = Counter()

    def emit(self, record):
        text = record.getMessage()
        if "recompile_limit" in text and "function:" in text:
            self.hits[text.split("function: ")[1].split("'")[1]] += 1


def run(cfg, held: list[dict], limit: int, fsdp: bool) -> dict:
    hits = LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = R1Model(cfg.model)
    compile_blocks(model, backend="aot_eager")
    torch._dynamo.config.recompile_limit = limit  # after compile_blocks, which raises it
    rt = local_runtime("fp32")  # bf16 is refused on a CPU: FSDP2 here keeps fp32 weights
    if fsdp: shard_model(model, rt)  # as bench/step_vs_dense.py shards its fsdp+compile arm
    stage = lm_stage(cfg, "sft", steps=10**6, evaluate=None)
    trainer = Trainer(model, stage, cfg, Path(tempfile.mkdtemp()), rt, callbacks=[])
    start = time.perf_counter()
    batches = iter(held)
    for _ in range(len(held) // stage.grad_accum):
        trainer.train_step(trainer.micro_batches(batches))
    kinds = Counter(type(b).__name__ for b in all_blocks(model))
    return dict(recompile_limit=limit, fsdp=fsdp, seconds=round(time.perf_counter() - start, 1),
                frames_compiled=counters["frames"]["ok"], frames_total=counters["frames"]["total"],
                unique_graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()),
                graph_break_reasons={k[:120]: v for k, v in counters["graph_break"].items()},
                recompile_limit_hits=dict(hits.hits),
                block_kinds=dict(kinds))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 at world size 1, as the GPU arm does")
    p.add_argument("--out", default="research/2026-12-06-compile-recompiles/recompiles_cpu.json")
    args = p.parse_args()
    cfg = resolve_config(None, args.preset, ["train.wandb=disabled", "train.ckpt_every=0", "data.num_workers=0"])
    st = cfg.stages["sft"]
    held = list(itertools.islice(build_loader(cfg, "train", st.mixture, batch_size=st.batch_size,
                                              max_tokens=st.max_tokens), args.batches))
    shapes = sorted({(tuple(b["input_ids"].shape), int(b["has_image"].any()), tuple(b["audio"].shape)) for b in held})
    rows = []
    for limit in (8, 64):
        rows.append(run(cfg, held, limit, args.fsdp))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(dict(command=f"python research/2026-12-06-compile-recompiles/recompiles.py "
                                                      f"--preset {args.preset} --batches {args.batches}" + " --fsdp" * args.fsdp,
                                              preset=args.preset, micro_batches=len(held),
                                              distinct_batch_shapes=len(shapes), rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
