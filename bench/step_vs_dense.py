"""Our training step against a plain dense decoder of the same width, depth, vocabulary and tokens, in one run on one
GPU: tokens/s, MFU and peak memory of each, and our MFU as a ratio of the plain decoder's.

    python bench/step_vs_dense.py [--preset base] [--stages sft] [--steps 10] [--arms ddp fsdp] [--out FILE]

Our arms run the launch's Trainer on 8 real batches of each stage held in memory (the loader is measured elsewhere;
--stages pretrain align sft measures stages 1 and 2 too, with the FLOPs each stage counts: stage 1 the decoder on
text and each encoder on its own modality, stage 2 the three encoders):
`ddp` is the model as one process trains it today (fp32 weights under bf16 autocast), `fsdp` the same model under
FSDP2 at world size 1 (bf16 compute weights over fp32 master weights), `+ckpt` arms add activation checkpointing,
`+compile` arms compile each block (r1_scratch.distributed.compile_blocks). An arm may carry its own config overrides
after `@`, comma-separated: `fsdp+compile@model.expert_families=false` is that arm on identical SwiGLU experts.
The plain decoder is built from 03_layers' `TransformerBlock` (pre-norm, causal SDPA, SwiGLU of the experts'
active width) with a tied LM head and fused AdamW, on as many tokens per step as our step averages; it runs eager
and under torch.compile. MFU counts model FLOPs (each stage's own count for ours: model_flops for stage 3, the
same formula for the plain decoder) against the H200's 989 TFLOP/s dense bf16 peak.
"""
import argparse
import itertools
import json
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from r1_scratch.data import build_loader
from r1_scratch.distributed import apply_activation_checkpointing, compile_blocks, shard_model
from r1_scratch.launch import STAGES, resolve_config
from r1_scratch.layers import RMSNorm, TransformerBlock, init_weights
from r1_scratch.model import R1Model
from r1_scratch.runtime import local_runtime
from r1_scratch.trainer import Trainer

PEAK_TFLOPS = 989.0


def timed(step, steps: int) -> tuple[float, float]:
    "Seconds per step after 3 warm-up steps, and the peak GPU memory in GB."
    for _ in range(3): step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps): step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 1e9


def arm_config(preset: str, overrides: list[str], arm: str):
    "The run's config with the arm's own overrides (after '@', comma-separated) on top."
    extra = arm.partition("@")[2]
    return resolve_config(None, preset, [*overrides, *(extra.split(",") if extra else [])])


def our_arm(cfg, held: list[dict], arm: str, steps: int, stage_name: str = "sft") -> dict:
    "The launch's Trainer on held batches of a stage: tokens, FLOPs and time of a step (means over the timed steps)."
    rt = local_runtime("bf16")
    torch.manual_seed(0)
    model = R1Model(cfg.model).to(rt.device)
    name = arm.partition("@")[0]
    if "compile" in name: compile_blocks(model)
    if "ckpt" in name: apply_activation_checkpointing(model, "full")
    if name.startswith("fsdp"): shard_model(model, rt)
    stage = STAGES[stage_name](cfg, stage_name, steps=10**6, evaluate=None)
    trainer = Trainer(model, stage, cfg, Path(tempfile.mkdtemp()), rt, callbacks=[])
    batches = itertools.cycle(held)
    work, losses = [], []
    def step():
        result = trainer.train_step(trainer.micro_batches(batches))
        work.append((result.metrics["tokens"], result.metrics["flops"]))
        losses.append(round(result.loss, 4))
    seconds, peak = timed(step, steps)
    tokens, flops = (sum(w[i] for w in work[-steps:]) / steps for i in (0, 1))  # stage 1's steps differ by modality
    return dict(arm=arm, stage=stage_name, step_s=round(seconds, 4), tokens_per_step=int(tokens),
                tokens_per_s=round(tokens / seconds),
                mfu=round(flops / seconds / 1e12 / PEAK_TFLOPS, 4), peak_gb=round(peak, 2),
                losses=losses)  # every step's loss, warm-up included: the arms' curves must overlay


class PlainDecoder(nn.Module):
    "A dense GPT from the project's blocks: token embedding, pre-norm causal blocks, tied head."
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        init_weights(self, layers)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks: x = block(x, causal=True)
        return F.linear(self.norm(x), self.embed.weight)


def held_batches(cfg, stage_name: str) -> list[dict]:
    "8 batches of a stage's own loader (its mixture, batch size and token budget)."
    st = cfg.stages[stage_name]
    one_source = stage_name == "pretrain"  # stage 1 trains on one modality per batch (13_stage1_pretrain)
    return list(itertools.islice(build_loader(cfg, "train", st.mixture or None, batch_size=st.batch_size,
                                              max_tokens=st.max_tokens, one_source_per_batch=one_source), 8))


def plain_arm(cfg, tokens: int, steps: int, compiled: bool) -> dict:
    "The plain decoder on `tokens` per step (micro-batches of the preset's context), bf16 autocast, fused AdamW."
    m, st = cfg.model, cfg.stages["sft"]
    accum = st.grad_accum or cfg.train.grad_accum
    length = min(m.max_seq_len, 2048)
    rows = max(1, round(tokens / accum / length))
    model = PlainDecoder(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.top_k * m.expert_hidden).cuda()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, m.vocab_size, (accum, rows, length + 1), device="cuda")
    def step():
        for i in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = forward(ids[i, :, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), ids[i, :, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds, peak = timed(step, steps)
    n = accum * rows * length
    matmul = sum(p.numel() for p in model.blocks.parameters() if p.dim() >= 2) + m.vocab_size * m.d_model
    flops = 6 * matmul * n + 12 * m.n_layers * m.d_model * length * n
    return dict(arm="plain dense" + (", compiled" if compiled else ""), step_s=round(seconds, 4), tokens_per_step=n,
                tokens_per_s=round(n / seconds), mfu=round(flops / seconds / 1e12 / PEAK_TFLOPS, 4),
                peak_gb=round(peak, 2))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="base")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--arms", nargs="+", default=["ddp", "fsdp"])
    p.add_argument("--stages", nargs="+", default=["sft"], choices=list(STAGES)[:3])
    p.add_argument("--out", default="bench/results/step_vs_dense_h200.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    # 4 loader workers: data_samples/ has 4 shards a source (the held batches are read once anyway)
    overrides = ["train.wandb=disabled", "train.ckpt_every=0", "data.num_workers=4", *args.overrides]
    cfg = resolve_config(None, args.preset, overrides)
    rows = []
    for stage_name in args.stages:
        held = held_batches(cfg, stage_name)
        for arm in args.arms:
            rows.append(our_arm(arm_config(args.preset, overrides, arm), held, arm, args.steps, stage_name))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    tokens = next((r for r in rows if r["stage"] == "sft"), rows[0])["tokens_per_step"]
    for compiled in (False, True):
        rows.append(plain_arm(cfg, tokens, args.steps, compiled))
        print(json.dumps(rows[-1]), flush=True)
    best_plain = max(r["mfu"] for r in rows if r["arm"].startswith("plain"))
    for r in rows: r["mfu_vs_best_plain"] = round(r["mfu"] / best_plain, 3)
    ours = [r for r in rows if "losses" in r]
    # the same model on the same batches in the same order: a faster step must not change what is learned
    for r in ours:
        first = next(o for o in ours if o["arm"].partition("@")[2] == r["arm"].partition("@")[2]
                     and o["stage"] == r["stage"])
        r["largest_loss_gap_vs_first_arm"] = round(max(abs(a - b) for a, b in zip(r["losses"], first["losses"])), 4)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(command="python " + " ".join(sys.argv), commit=commit, preset=args.preset,
                  device=torch.cuda.get_device_name(), rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
