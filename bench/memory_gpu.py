"""Peak memory of real training steps against the memory planner (r1_scratch.memory, nbs/19_scaling.ipynb).

For each configuration: build the model, checkpoint its blocks, wrap it (FSDP2 at world size 1, or plain), run three
steps (forward, next-token + MoE losses, backward, AdamW) on random worst-case batches of the planned micro-batch
in bf16, and record torch.cuda.max_memory_allocated / max_memory_reserved next to the plan's parts.

    python bench/memory_gpu.py --out bench/results/memory_h100.json   # one GPU (~2 min); the 8-layer slices need 80+ GiB
    python bench/memory_gpu.py --device cpu --preset tiny     # seconds: live tensor bytes in fp32, memory_cpu.json
"""
import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from r1_scratch.config import apply_overrides, get_preset
from r1_scratch.memory import measure_peak, plan_memory, sample_shape, synthetic_batch, train_steps
from r1_scratch.model import R1Model

from r1_scratch.distributed import apply_activation_checkpointing, shard_model
from r1_scratch.runtime import Runtime

SLICE = ["model.vision_layers=2", "model.audio_layers=2", "model.text_layers=1"]  # full width, small encoders
GPU_CONFIGS = [  # name, preset, overrides, samples, checkpointing, strategy, cpu_offload
    ("base", "base", [], 8, "none", "ddp", False),
    ("base, full checkpointing", "base", [], 8, "full", "ddp", False),
    ("base, selective checkpointing", "base", [], 8, "selective", "ddp", False),
    ("r1_22b, 2 decoder layers", "r1_22b", ["model.n_layers=2", *SLICE], 2, "none", "fsdp", False),
    ("r1_22b, 2 decoder layers, full", "r1_22b", ["model.n_layers=2", *SLICE], 4, "full", "fsdp", False),
    ("r1_22b, 4 decoder layers, selective", "r1_22b", ["model.n_layers=4", *SLICE], 2, "selective", "fsdp", False),
    ("r1_22b, 6 decoder layers, full", "r1_22b", ["model.n_layers=6", *SLICE], 4, "full", "fsdp", False),
    ("r1_22b, 8 decoder layers, full", "r1_22b", ["model.n_layers=8", *SLICE], 4, "full", "fsdp", False),
    ("r1_22b, 8 decoder layers, none", "r1_22b", ["model.n_layers=8", *SLICE], 1, "none", "fsdp", False),
    ("r1_22b, 4 decoder layers, full, offload", "r1_22b", ["model.n_layers=4", *SLICE], 4, "full", "fsdp", True),
]


def run_one(name, preset, overrides, samples, mode, strategy, offload, device, steps):
    "Build, wrap and train one configuration; return its plan and measured peak as a dict."
    cfg = apply_overrides(get_preset(preset), overrides)
    precision = "bf16" if device == "cuda" else "fp32"  # the MoE's bf16 path does not run on a CPU
    fsdp = strategy == "fsdp" and device == "cuda"
    ran_as = "FSDP2, world size 1" if fsdp else "one process, no wrapper"
    plan = plan_memory(cfg, "fsdp" if fsdp else "ddp", 1, samples * sample_shape(cfg).decoder, mode, offload and fsdp,
                       precision, shape=sample_shape(cfg))  # the batch it measures: worst-case samples
    torch.manual_seed(0)
    with torch.device(device):
        model = R1Model(cfg.model)
    model.to(device)  # the audio filterbank is built on the CPU on purpose (06_audio_encoder): move it too
    apply_activation_checkpointing(model, mode)
    if fsdp:
        shard_model(model, Runtime(torch.device(device), rank=0, world=1, local_rank=0, precision=precision), offload)
    batch = synthetic_batch(cfg, samples, device)
    out = dict(name=name, preset=preset, overrides=overrides, samples=samples,
               tokens=samples * sample_shape(cfg).decoder, checkpointing=mode, strategy=strategy, cpu_offload=offload,
               ran_as=ran_as, precision=precision, predicted=dict(parts={k: int(v) for k, v in plan.parts.items()},
                                                                  total=int(plan.total), allocated=int(plan.allocated),
                                                                  phase=plan.phase))
    start = time.perf_counter()
    try:
        if device == "cpu":
            measured = dict(max_allocated=measure_peak(model, batch, steps, precision)["peak"])
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not (offload and fsdp))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_steps(model, batch, optimizer, steps, precision)
            torch.cuda.synchronize()
            measured = dict(max_allocated=torch.cuda.max_memory_allocated(),
                            max_reserved=torch.cuda.max_memory_reserved())
    except torch.OutOfMemoryError as error:
        measured = dict(error=str(error).splitlines()[0])
    except Exception as error:  # one configuration's failure is recorded; the others still run
        measured = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0]}")
    out.update(measured=measured, seconds=round(time.perf_counter() - start, 1))
    if "max_allocated" in measured:
        out["ratio_allocated"] = round(plan.allocated / measured["max_allocated"], 3)  # predicted / measured
    if "max_reserved" in measured:
        out["reserved_over_allocated"] = round(measured["max_reserved"] / measured["max_allocated"], 3)  # slack
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default=None, help="one preset, checkpointing none/selective/full (default: the list)")
    p.add_argument("--samples", type=int, default=2, help="worst-case samples per micro-batch with --preset")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, help="run only the configurations whose name contains this text")
    args = p.parse_args()
    strategy = "fsdp" if args.device == "cuda" else "ddp"
    configs = GPU_CONFIGS if args.preset is None else [(f"{args.preset}, {mode}", args.preset, [], args.samples, mode,
                                                        strategy, False) for mode in ("none", "selective", "full")]
    configs = [c for c in configs if args.only is None or args.only in c[0]]
    if not configs: raise SystemExit(f"no configuration name contains {args.only!r}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "r1_scratch"], capture_output=True, text=True).stdout
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    commit += " (r1_scratch modified)" if dirty.strip() else ""
    result = dict(command=" ".join(["python", *sys.argv]), commit=commit, device=device, torch=torch.__version__,
                  note="predicted.allocated is the plan less its slack, compared with max_memory_allocated; "
                       "reserved_over_allocated is the allocator's measured slack (the plan assumes 1.1).",
                  configs=[])
    out = Path(args.out or f"bench/results/memory_{'gpu' if args.device == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for config in configs:
        result["configs"].append(run_one(*config, args.device, args.steps))
        print(json.dumps(result["configs"][-1]), flush=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after each one: a time limit keeps what finished
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
