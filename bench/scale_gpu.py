"""The largest slice of the article's 22B model that one GPU trains: full width, as many decoder blocks as the memory
planner says fit, FSDP2 (bf16 compute over fp32 master weights) and activation checkpointing, stage 3 on the real
loader. Tokens/s, MFU and the peak memory against the planner's prediction.

    python bench/scale_gpu.py [--layers N] [--steps 30] [--checkpointing full] [--offload] [--headroom 0.9]
                              [--out bench/results/scale_h200.json] [key=value ...]

Without --layers the planner (r1_scratch.memory.plan_memory) picks the most decoder blocks whose predicted peak is
under --headroom of the GPU's memory. The slice keeps r1_22b's encoders (24 blocks each at width 2048, 640 px images)
and its stage-3 micro-batches (65,536 tokens). It is built on the GPU directly (the CPU would spend minutes
initialising 8B weights), trains the launch's stage 3 through the Trainer, and saves no checkpoint: the slice's
weights and AdamW state would not fit the machine's disk. MFU counts r1_scratch.model.model_flops against the H200's
989 TFLOP/s dense bf16 peak.
"""
import argparse
import json
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

from r1_scratch.distributed import wrap_model
from r1_scratch.launch import resolve_config
from r1_scratch.memory import plan_memory
from r1_scratch.model import R1Model, count_parameters
from r1_scratch.runtime import local_runtime
from r1_scratch.sft import sft_stage
from r1_scratch.trainer import Trainer

PEAK_TFLOPS = 989.0


def slice_config(layers: int, checkpointing: str, offload: bool, overrides: list[str]):
    return resolve_config(None, "r1_22b", [f"model.n_layers={layers}", "dist.strategy=fsdp",
                                           f"train.activation_checkpointing={checkpointing}",
                                           f"dist.cpu_offload={str(offload).lower()}", "train.wandb=disabled",
                                           "train.ckpt_every=0", "train.eval_every=0",
                                           "data.num_workers=4",  # data_samples/ has 4 shards a source; r1_22b asks 8
                                           *overrides])


def plan(cfg):
    t = cfg.train
    return plan_memory(cfg, "fsdp", 1, None, t.activation_checkpointing, cfg.dist.cpu_offload, "bf16")


def most_layers(args, gpu_bytes: float) -> int:
    "The most decoder blocks whose planned peak stays under the headroom."
    fits = [n for n in range(1, 33)
            if plan(slice_config(n, args.checkpointing, args.offload, args.overrides)).total <= args.headroom * gpu_bytes]
    if not fits: raise SystemExit("the planner fits not even one decoder block: try --offload")
    return max(fits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--checkpointing", default="full")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--headroom", type=float, default=0.9)
    p.add_argument("--out", default="bench/results/scale_h200.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    layers = args.layers or most_layers(args, gpu_bytes)
    cfg = slice_config(layers, args.checkpointing, args.offload, args.overrides)
    predicted = plan(cfg)
    print(predicted.table(), flush=True)
    rt = local_runtime("bf16")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(rt.device): model = R1Model(cfg.model)
    model.to(rt.device)  # the audio filterbank is built on the CPU on purpose (06_audio_encoder): move it too
    counts = count_parameters(model)
    model = wrap_model(model, cfg, rt)
    stage = sft_stage(cfg, "sft", steps=10**6, evaluate=None)
    trainer = Trainer(model, stage, cfg, Path(tempfile.mkdtemp()), rt, callbacks=[])
    built = time.perf_counter() - t0
    batches, rows = iter(stage.loader), []
    for step in range(args.steps):
        start = time.perf_counter()
        result = trainer.train_step(trainer.micro_batches(batches))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(dict(step=step + 1, loss=round(result.loss, 4), seconds=round(seconds, 3),
                         tokens=int(result.metrics["tokens"]), flops=result.metrics["flops"]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "flops"}), flush=True)
    steady = rows[2:]  # the first steps warm the allocator and the loader
    seconds = sum(r["seconds"] for r in steady)
    peak = torch.cuda.max_memory_allocated()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(command="python " + " ".join(sys.argv), commit=commit, device=torch.cuda.get_device_name(),
                  gpu_gib=round(gpu_bytes / 2**30, 1), decoder_blocks=layers, checkpointing=args.checkpointing,
                  cpu_offload=args.offload, parameters_b=round(counts["total"] / 1e9, 2),
                  active_parameters_b=round(counts["active"] / 1e9, 2), build_seconds=round(built, 1),
                  tokens_per_s=round(sum(r["tokens"] for r in steady) / seconds),
                  mfu=round(sum(r["flops"] for r in steady) / seconds / 1e12 / PEAK_TFLOPS, 4),
                  peak_allocated_gib=round(peak / 2**30, 2), predicted_allocated_gib=round(predicted.allocated / 2**30, 2),
                  predicted_over_measured=round(predicted.allocated / peak, 3), predicted_phase=predicted.phase,
                  predicted_parts_gib={k: round(v / 2**30, 2) for k, v in predicted.parts.items()},
                  first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"],
                  steps=[{k: v for k, v in r.items() if k != "flops"} for r in rows])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))


if __name__ == "__main__":
    main()
