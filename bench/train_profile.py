"""Where a training step of a preset spends its time on one GPU: the steps timed plainly, then torch.profiler over as
many steps on batches held in memory, top ops by GPU time and by CPU time, and the GPU's idle share.

    python bench/train_profile.py [--preset small] [--steps 3] [--out bench/results/train_profile_h200.json] [key=value ...]

The model is wrapped as the launch wraps it, so `train.compile=true dist.strategy=fsdp` profiles that step.
"""
import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from r1_scratch.data import build_loader
from r1_scratch.distributed import wrap_model
from r1_scratch.launch import resolve_config
from r1_scratch.model import R1Model
from r1_scratch.runtime import local_runtime
from r1_scratch.trainer import Trainer, lm_stage


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="bench/results/train_profile_h200.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    # 4 loader workers: data_samples/ has 4 shards a source, and the larger presets ask for 8
    cfg = resolve_config(None, args.preset, ["train.wandb=disabled", "train.ckpt_every=0", "data.num_workers=4",
                                             *args.overrides])
    st = cfg.stages["sft"]
    held = list(itertools.islice(build_loader(cfg, "train", st.mixture, batch_size=st.batch_size,
                                              max_tokens=st.max_tokens), 8))
    rt = local_runtime(cfg.train.precision)
    model = wrap_model(R1Model(cfg.model).to(rt.device), cfg, rt)  # as the launch trains it: train.compile, dist.*
    stage = lm_stage(cfg, "sft", steps=10**6, evaluate=None)
    trainer = Trainer(model, stage, cfg, Path("/tmp/bench_profile"), rt, callbacks=[])
    batches = itertools.cycle(held)
    step = lambda: trainer.train_step(trainer.micro_batches(batches))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # The profiler's own per-op cost inflates a launch-bound step: time the same steps without it first.
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    plain_step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    wall_us = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    gpu_us = sum(e.self_device_time_total for e in events)
    top = lambda key: [dict(op=e.key[:80], ms=round(getattr(e, key) / 1e3 / args.steps, 3), calls=e.count // args.steps)
                       for e in sorted(events, key=lambda e: -getattr(e, key))[:15]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(command="python " + " ".join(sys.argv), commit=commit, device=torch.cuda.get_device_name(),
                  preset=args.preset, steps=args.steps, plain_step_ms=round(plain_step_ms, 2),
                  step_ms=round(wall_us / 1e3 / args.steps, 2),
                  gpu_busy_ms=round(gpu_us / 1e3 / args.steps, 2), gpu_busy_share=round(gpu_us / wall_us, 3),
                  top_gpu=top("self_device_time_total"), top_cpu=top("self_cpu_time_total"))
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
