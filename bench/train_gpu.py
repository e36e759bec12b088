"""The launch's training loop on 1, 2, 4 ... GPUs (DDP through torchrun): tokens/s and MFU for a preset.

MFU = model FLOPs per second / (GPUs x 989 TFLOP/s, the H200's dense bf16 peak). Model FLOPs are counted by
r1_scratch.model.model_flops: 6 x the active matmul parameters (routed experts at top_k / n_experts of their
weight, embedding tables excluded, the tied LM head included) x the real tokens each part processes (decoder:
text + image patches + audio frames; each encoder its own tokens), plus attention's 12 x layers x width x padded
length per token. Throughput is measured over the steps after the first (warm-up) from each step's own time.

    python bench/train_gpu.py [--preset small] [--gpus 1 2 4] [--steps 30] [--cached 8] [--workers 4 12] [--data DIR]
                              [--loader-batches 200] [--out bench/results/train_h200.json] [key=value ...]

With --cached N it also times the Trainer on N batches held in memory (eager, then torch.compile): the model and
loop alone, without the data loader, which on data_samples/ (4 shards per source, so at most 4 loader workers)
is the bottleneck.

Each launch row reports data_wait_share: the share of the steps' time spent waiting in next() for the loader.
--workers N ... repeats the launch rows for each loader worker count, and with --loader-batches adds rows for
the loader alone (no model: batches and decoder tokens per second), to tell the loader's speed from the
model's. --data DIR trains on the shards of a grown data folder (bench/stages_gpu.py --grow-only).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

PEAK_TFLOPS = 989.0  # H200 (and H100 SXM) dense bf16


def run(preset: str, gpus: int, steps: int, overrides: list[str], out_dir: Path) -> dict:
    name = f"bench-{preset}-{gpus}gpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "r1_scratch/launch.py", "--preset", preset, "--stages", "sft", "--name", name, "--fresh", f"train.out_dir={out_dir}",
           f"stages.sft.steps={steps}", "train.ckpt_every=0", "train.eval_every=0", "train.log_every=5",
           "train.wandb=disabled", "stages.sft.options={expert_dropout: 0.3, eval_batches: 2, answer_samples: 8}",
           *overrides]  # stages.sft.steps, not train.max_steps: a preset's own stage steps win over max_steps
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "R1_NO_PROGRESS": "1"})
    if result.returncode:
        return dict(gpus=gpus, error=result.stderr[-2000:])
    summary = json.loads((out_dir / name / "sft" / "summary.json").read_text())
    tflops = summary["model_tflops_per_s"]
    return dict(gpus=gpus, steps=summary["steps"], last_loss=summary["last_loss"], val_loss=summary.get("val_loss"),
                tokens_per_s=summary["steady_tokens_per_s"], target_tokens_per_s=summary["steady_targets_per_s"],
                model_tflops_per_s=tflops, mfu=round(tflops / (gpus * PEAK_TFLOPS), 4),
                tokens_per_s_per_gpu=round(summary["steady_tokens_per_s"] / gpus, 1),
                data_wait_share=summary.get("data_wait_share"))


def loader_rate(preset: str, workers: int, batches: int, overrides: list[str]) -> dict:
    "Stage 3's loader alone, no model: batches and decoder tokens (as the trainer counts them) per second."
    import time
    from r1_scratch.data import build_loader
    from r1_scratch.launch import resolve_config
    from r1_scratch.model import build_on_meta, count_tokens
    cfg = resolve_config(None, preset, overrides)
    st, counter = cfg.stages["sft"], build_on_meta(cfg.model)
    it = iter(build_loader(cfg, "train", st.mixture, batch_size=st.batch_size, max_tokens=st.max_tokens,
                           num_workers=workers))
    for _ in range(2 * max(workers, 1)): next(it)  # every worker started and producing
    t0, tokens, megabytes = time.perf_counter(), 0, 0.0
    for _ in range(batches):
        batch = next(it)
        tokens += count_tokens(counter, batch)
        megabytes += sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v)) / 1e6
    seconds = time.perf_counter() - t0
    it.close()  # stop this loader's workers before the next setting starts its own
    return dict(mode=f"loader alone, {workers} workers", workers=workers, batches=batches,
                batches_per_s=round(batches / seconds, 1), tokens_per_s=round(tokens / seconds, 1),
                megabytes_per_batch=round(megabytes / batches, 1))


def run_cached(preset: str, steps: int, batches: int, overrides: list[str]) -> dict:
    "The Trainer on one GPU with `batches` batches held in memory and cycled: the model's speed without the loader."
    import itertools
    from r1_scratch.data import build_loader
    from r1_scratch.launch import resolve_config
    from r1_scratch.model import R1Model
    from r1_scratch.runtime import local_runtime
    from r1_scratch.trainer import Trainer, lm_stage
    cfg = resolve_config(None, preset, ["train.wandb=disabled", "train.ckpt_every=0", "train.eval_every=0", *overrides])
    st = cfg.stages["sft"]
    held = list(itertools.islice(build_loader(cfg, "train", st.mixture, batch_size=st.batch_size, max_tokens=st.max_tokens),
                                 batches))
    cycle = type("Cycle", (), {"__iter__": lambda self: itertools.cycle(held)})()
    rt = local_runtime(cfg.train.precision)
    torch.manual_seed(0)
    model = R1Model(cfg.model).to(rt.device)
    train_model = torch.compile(model) if cfg.train.compile else model
    stage = lm_stage(cfg, "sft", loader=cycle, steps=steps, evaluate=None)
    trainer = Trainer(train_model, stage, cfg, Path("/tmp/bench_cached"), rt, callbacks=[])
    summary = trainer.fit(resume=False)
    tflops = summary["model_tflops_per_s"]
    return dict(gpus=1, mode="cached batches" + (", compiled" if cfg.train.compile else ""), steps=steps,
                last_loss=summary["last_loss"], tokens_per_s=summary["steady_tokens_per_s"],
                target_tokens_per_s=summary["steady_targets_per_s"], model_tflops_per_s=tflops,
                mfu=round(tflops / PEAK_TFLOPS, 4), peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--gpus", type=int, nargs="*", default=[1, 2, 4], help="launch runs on these GPU counts (none: skip)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="bench/results/train_h200.json")
    p.add_argument("--runs", default="/tmp/bench_runs")
    p.add_argument("--cached", type=int, default=0, help="also time N in-memory batches cycled (no loader), eager and compiled")
    p.add_argument("--eager-only", action="store_true", help="with --cached: skip the torch.compile row")
    p.add_argument("--workers", type=int, nargs="*", default=[], help="launch rows for each of these data.num_workers")
    p.add_argument("--loader-batches", type=int, default=0, help="with --workers: also time the loader alone")
    p.add_argument("--data", help="a grown data folder (bench/stages_gpu.py --grow-only) instead of data_samples/")
    # key=value overrides may come anywhere: split them off first, or `--workers 4 a.b=1` would read a.b=1 as a count
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in sys.argv[1:] if a not in overrides])
    args.overrides = overrides
    available = torch.cuda.device_count()
    if args.data:
        from stages_gpu import shard_pattern  # bench/ is this script's folder, so it is on sys.path
        args.overrides = [f"data.train={shard_pattern(Path(args.data), 'train')}", *args.overrides]
    source = f"{args.data} loader" if args.data else "data_samples loader"
    settings = [(f"launch, {source}", [])] if not args.workers else \
               [(f"launch, {source}, {w} workers", [f"data.num_workers={w}"]) for w in args.workers]
    rows = []
    for mode, extra in settings:
        for n in args.gpus:
            if n > available: continue
            rows.append(run(args.preset, n, args.steps, [*args.overrides, *extra], Path(args.runs)) | dict(mode=mode))
            print(json.dumps(rows[-1]), flush=True)
    for w in args.workers if args.loader_batches else []:
        rows.append(loader_rate(args.preset, w, args.loader_batches, args.overrides))
        print(json.dumps(rows[-1]), flush=True)
    if args.cached:
        for compiled in ("false",) if args.eager_only else ("false", "true"):
            try: row = run_cached(args.preset, args.steps, args.cached, [*args.overrides, f"train.compile={compiled}"])
            except Exception as error:  # e.g. an Inductor failure: record it, keep the other rows
                row = dict(gpus=1, mode=f"cached batches, compile={compiled}", error=f"{type(error).__name__}: {str(error)[:1500]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cudnn_attention = os.environ.get("R1_CUDNN_ATTENTION") == "1"  # else the decoder leaves cuDNN attention out (00_runtime)
    result = dict(command="python " + " ".join(sys.argv), commit=commit, cudnn_attention=cudnn_attention,
                  device=torch.cuda.get_device_name() if available else "cpu", gpus_available=available,
                  torch=torch.__version__, preset=args.preset, overrides=args.overrides, peak_tflops_per_gpu=PEAK_TFLOPS,
                  skipped_gpu_counts=[n for n in args.gpus if n > available], rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
