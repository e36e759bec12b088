"""The `small` preset with multi-head latent attention against multi-head attention on one GPU: all three stages of
each through bench/stages_gpu.py on the same grown data, every validation metric side by side, then the generation
cache (bytes) and decoding speed (tokens/s) of each attention at long context.

    python bench/mla_gpu.py [--preset small] [--scale 16] [--val-draws 10] [--arms mha mla] [--generation-only]
                            [--detach LOG] [--out FILE] [key=value ...]

The JSON (default bench/results/mla_small_h200.json) is rewritten after every part: the generation measurement
first (about a minute), then each arm as it finishes, so a run cut short keeps what it measured. `side_by_side`
holds each validation metric of both arms and their difference (MLA - MHA); `within_2_points` says whether every
accuracy and R@1 of MLA is within 0.02 of MHA's. key=value overrides go to both arms (e.g. stages.sft.steps=560).

How long: one arm of `small` at --scale 16 trained stages 1-3 in about 15 min on an H200 (stages_gpu.py's
docstring), so both arms take about 30 min, longer than one 10-minute command. Start it with --detach LOG, which
returns at once with the process id, and poll the JSON and LOG in later calls on the same machine. On a machine
with two GPUs the arms run at the same time, one GPU each (about 15 min in all). --generation-only measures the
generation part alone, within one short call.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
POINT_METRICS = ("accuracy", "R@1", "R@5")  # rates in [0, 1], which "within 2 points" reads; losses are only shown


def generation_speed(preset: str, attention: str, contexts: list[int], batch_size: int, new_tokens: int,
                     device: str = "cuda") -> list[dict]:
    """bf16 decoding of `new_tokens` after text prompts of each context length: the cache's bytes after the prefill
    (every layer's entries, as `generate()` keeps them), the prefill's seconds, decoded tokens/s and the peak memory.
    Random weights: the speed and the cache do not depend on what the model learned."""
    import torch
    from r1_scratch.config import apply_overrides, get_preset
    from r1_scratch.mla import cache_bytes, cache_elements_per_token
    from r1_scratch.model import R1Model, generate
    cfg = apply_overrides(get_preset(preset), [f"model.attention={attention}"])
    torch.manual_seed(0)
    m = cfg.model
    model = R1Model(m).to(device, torch.bfloat16).eval()
    on_gpu = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rows = []
    for context in contexts:
        ids = torch.randint(4, cfg.model.vocab_size, (batch_size, context), device=device)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                     images=torch.zeros(batch_size, m.image_channels, m.image_size, m.image_size, device=device,
                                        dtype=torch.bfloat16),
                     has_image=torch.zeros(batch_size, dtype=torch.bool, device=device),
                     audio=torch.zeros(batch_size, 1, device=device, dtype=torch.bfloat16),
                     audio_lengths=torch.zeros(batch_size, dtype=torch.long, device=device))
        if on_gpu: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            sync(); t0 = time.perf_counter()
            kv = model(batch, return_kv=True).kv
            sync(); prefill = time.perf_counter() - t0
            cached = cache_bytes(kv)
            del kv
            generate(model, batch, max_new_tokens=4)  # warm-up: kernels chosen, allocator grown
            sync(); t0 = time.perf_counter()
            generate(model, batch, max_new_tokens=new_tokens)
            sync(); total = time.perf_counter() - t0
        rows.append(dict(context=context, batch_size=batch_size, new_tokens=new_tokens,
                         cache_bytes=cached, cache_bytes_per_token=cached / (batch_size * context),
                         formula_bytes_per_token=2 * cache_elements_per_token(cfg.model, attention),
                         prefill_seconds=round(prefill, 4), generate_seconds=round(total, 3),
                         decode_tokens_per_s=round(batch_size * new_tokens / (total - prefill), 1),
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None))
        print(attention, rows[-1], flush=True)
    return rows


def flat_metrics(arm: dict) -> dict:
    "Every validation number of one stages_gpu.py result: stage summaries' val_*, the evaluation and fresh questions."
    out = {}
    for stage, summary in arm.get("stages", {}).items():
        numbers = {k: v for k, v in summary.items() if k.startswith("val_") and isinstance(v, (int, float))}
        out.update({f"{stage}.{k}": v for k, v in numbers.items()})
    ev = arm.get("eval", {})
    out.update({f"eval.retrieval.{k}": v for k, v in ev.get("retrieval", {}).items() if isinstance(v, (int, float))})
    out.update({f"eval.pretrain.{k}": v for k, v in ev.get("pretrain", {}).items()})
    for task, m in ev.get("language_model", {}).get("tasks", {}).items():
        out.update({f"eval.lm.{task}.{k}": m[k] for k in ("loss", "accuracy") if k in m})
    for task, m in ev.get("answers", {}).items():
        if isinstance(m, dict) and "accuracy" in m: out[f"eval.answers.{task}.accuracy"] = m["accuracy"]
    for task, m in arm.get("more_questions", {}).get("answers", {}).items():
        if isinstance(m, dict) and "accuracy" in m: out[f"fresh_questions.{task}.accuracy"] = m["accuracy"]
    return out


def side_by_side(arms: dict) -> tuple[dict, dict]:
    "Each metric of both arms and MLA - MHA; and which point metrics (rates) fall more than 0.02 below MHA."
    mha, mla = flat_metrics(arms.get("mha", {})), flat_metrics(arms.get("mla", {}))
    table = {k: dict(mha=mha.get(k), mla=mla.get(k),
                     mla_minus_mha=round(mla[k] - mha[k], 4) if k in mha and k in mla else None)
             for k in sorted(set(mha) | set(mla))}
    points = {k: row for k, row in table.items() if any(p in k for p in POINT_METRICS) and "chance" not in k
              and "blind" not in k and row["mla_minus_mha"] is not None}
    below = {k: row["mla_minus_mha"] for k, row in points.items() if row["mla_minus_mha"] < -0.02}
    return table, dict(compared=len(points), all_within=not below and bool(points), more_than_2_points_below=below)


def train_arm(attention: str, args, gpu: int | None, arm_out: Path) -> subprocess.Popen:
    "bench/stages_gpu.py for one attention, on GPU `gpu` (None: whatever is visible), its JSON into `arm_out`."
    cmd = [sys.executable, str(HERE / "stages_gpu.py"), "--preset", args.preset, "--scale", str(args.scale),
           "--data", args.data, "--runs", f"{args.runs}/{attention}", "--out", str(arm_out),
           "--eval-batches", str(args.eval_batches), *(["--val-draws", str(args.val_draws)] if args.val_draws else []),
           "train.eval_every=0", "train.ckpt_every=0", f"model.attention={attention}", *args.overrides]
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})}
    log = open(arm_out.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--scale", type=int, default=16, help="train data: K draws of the bundled train split")
    p.add_argument("--val-draws", type=int, default=10, help="fresh val questions: K draws (60 + 40 each)")
    p.add_argument("--data", default="runs/mla_data", help="where the generated train data goes (runs/ is ignored by git)")
    p.add_argument("--runs", default="runs/mla", help="where each arm's runs go")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--arms", nargs="+", default=["mha", "mla"], choices=["mha", "mla"])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--generation-only", action="store_true")
    p.add_argument("--detach", metavar="LOG", help="run in a new session, output to LOG, print the process id, return")
    p.add_argument("--out", default="bench/results/mla_small_h200.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    if args.detach and not os.environ.get("R1_MLA_DETACHED"):
        with open(args.detach, "w") as log:
            child = subprocess.Popen([sys.executable, *sys.argv], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "R1_MLA_DETACHED": "1"})
        print(child.pid)
        return
    import torch
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command=" ".join(["python", *sys.argv]), preset=args.preset, scale=args.scale,
                  device=f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    save = lambda: out.write_text(json.dumps(result, indent=1))
    result["generation"] = {a: generation_speed(args.preset, a, args.contexts, args.gen_batch, args.new_tokens)
                            for a in ("mha", "mla")}
    save()
    if args.generation_only: return
    grow = subprocess.run([sys.executable, str(HERE / "stages_gpu.py"), "--grow-only", "--scale", str(args.scale),
                           "--data", args.data, *(["--val-draws", str(args.val_draws)] if args.val_draws else [])],
                          cwd=ROOT, capture_output=True, text=True)  # once, shared by both arms
    if grow.returncode: result["grow_error"] = grow.stderr[-3000:]
    gpus = torch.cuda.device_count()
    arm_files = {a: out.with_name(f"{out.stem}_{a}.json") for a in args.arms}
    result["arms"], t0 = {}, time.perf_counter()
    if gpus >= len(args.arms):  # one GPU per arm, at the same time
        procs = {a: train_arm(a, args, i, arm_files[a]) for i, a in enumerate(args.arms)}
        for a, proc in procs.items(): proc.wait()
    for a in args.arms:
        if gpus < len(args.arms): train_arm(a, args, None, arm_files[a]).wait()
        result["arms"][a] = json.loads(arm_files[a].read_text()) if arm_files[a].exists() else {"error": "no result"}
        result["side_by_side"], result["within_2_points"] = side_by_side(result["arms"])
        result["train_wall_seconds"] = round(time.perf_counter() - t0, 1)
        save()
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps(result["within_2_points"], indent=1))


if __name__ == "__main__":
    main()
