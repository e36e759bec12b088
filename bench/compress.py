"""Compression of a trained checkpoint, measured: every recipe of `17_compression` and expert pruning by measured use.

    python bench/compress.py --run runs/tiny                       # the main job's model, on the CPU
    python bench/compress.py --run runs/small --device cuda --out bench/results/compress_small_h200.json

For each recipe (fp32, bf16, fp16, torchao int8 weight-only and int8 dynamic, int4 weight-only on a GPU) and for the
fp32 model pruned to 12, 8 and 4 experts per MoE layer (least used on the validation set dropped, the router
renormalised over the survivors): size on disk, peak memory of a prefill, prefill latency and generated tokens/s,
and every validation metric the launch reports, each as a share of the fp32 model's. Writes one JSON with the
command, the commit, the device and the goals checked: int8 at most 30% of the fp32 size with at least 99% of each
metric, 12 of 16 experts keeping at least 97%.

An accuracy on the bundled validation split rests on 40-60 questions: one question is 1.7-2.5% of it, more than the
1% that the int8 goal allows. So each goal's verdict is `met`, `missed`, or `within noise` (below the bar by less
than two standard errors of the difference of the two accuracies), and --questions scores every recipe on more
questions: fresh draws of the val questions, as `bench/stages_gpu.py --grow-only --val-draws K --data D` writes
them (a {task} pattern, D-questions/val/{task}-{000002..}.tar; none of them trained on). Their accuracies replace the
bundled ones in the shares and goals, and each row keeps both.
"""
import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1_scratch.compress import (RECIPES, compress, experts_to_keep, expert_load, measure, prune_experts,  # noqa: E402
                                 share_of)
from r1_scratch.config import config_from_dict, with_data_root  # noqa: E402
from r1_scratch.data import build_loader  # noqa: E402
from r1_scratch.data import expand_shards  # noqa: E402
from r1_scratch.launch import find_checkpoint  # noqa: E402
from r1_scratch.sft import answer_accuracy  # noqa: E402
from r1_scratch.model import R1Model  # noqa: E402
from r1_scratch.trainer import Checkpoints, to_device  # noqa: E402

QA_SOURCES = ("vqa", "audio_qa", "instruct", "reasoning")
INT8 = ("int8_weight", "int8_dynamic")


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def load_trained(run: str, device: torch.device):
    "The latest checkpoint under `run` as an fp32 model in eval mode, with its config (data paths from this checkout)."
    ckpt = find_checkpoint(run).resolve()
    cfg = with_data_root(config_from_dict(json.loads((ckpt / "meta.json").read_text())["config"]), ROOT)
    model = R1Model(cfg.model)
    Checkpoints(ckpt.parent).load(ckpt, model)
    return model.to(device).eval(), cfg, ckpt


def metric_names(row: dict) -> list[str]:
    return [k for k in row if "R@1" in k or k.endswith(("_accuracy", "loss"))]


def fresh_answers(model, cfg, questions: str) -> dict:
    "Greedy accuracy and question count on every question of the {task} pattern `questions`, per QA task found there."
    cfg = copy.deepcopy(cfg)
    cfg.data.val = questions
    out = {}
    for task in QA_SOURCES:
        try: expand_shards(questions.replace("{task}", task))
        except FileNotFoundError: continue
        with torch.no_grad(): result = answer_accuracy(model.eval(), cfg, task, max_samples=10**9, per_question=True)
        out |= {f"{task}_accuracy": result["accuracy"], f"{task}_samples": result["samples"],
                f"{task}_correct": result["correct"]}
    return out


def with_fresh(row: dict, fresh: dict) -> dict:
    "The row with the fresh questions' accuracies in place of the bundled ones, which stay as `bundled_*`."
    bundled = {f"bundled_{k}": row[k] for k in fresh if k in row}
    return row | bundled | fresh


def with_shares(rows: list[dict]) -> list[dict]:
    "Each row with its size and every metric as a share of the fp32 row's."
    reference = next(r for r in rows if r["recipe"] == "fp32")
    names = metric_names(reference)
    for row in rows:
        row["size_share"] = row["disk_mb"] / reference["disk_mb"]
        row["shares"] = share_of({k: row[k] for k in names}, {k: reference[k] for k in names})
    return rows


def shortfall(row: dict, reference: dict, metric: str, bar: float) -> tuple[float, float | None]:
    """How far a metric is below its bar (> 0: below) and the standard error of that gap, where one is known: a loss is
    judged by its share (fp32's loss over this one's) against `bar`, with no error; an accuracy in its own units
    against `bar` times fp32's, with the standard error of the difference of two accuracies: paired, question by
    question, where both rows hold their answers to the same questions (`{task}_correct`), else of two independent
    samples of the sizes scored."""
    if metric.endswith("loss"): return bar - reference[metric] / row[metric], None
    short = bar * reference[metric] - row[metric]
    if not metric.endswith("_accuracy"): return short, None
    mine, theirs = row.get(metric.replace("_accuracy", "_correct")), reference.get(metric.replace("_accuracy", "_correct"))
    if mine and theirs and len(mine) == len(theirs): return short, paired_error(mine, theirs)
    n_row, n_ref = row.get(metric.replace("_accuracy", "_samples")), reference.get(metric.replace("_accuracy", "_samples"))
    if not (n_row and n_ref): return short, None
    p, q = row[metric], reference[metric]
    return short, math.sqrt(p * (1 - p) / n_row + q * (1 - q) / n_ref)


def paired_error(mine: str, theirs: str) -> float:
    """The standard error of the mean of per-question differences (each -1, 0 or 1) between two '1'/'0' answer strings:
    questions both models get right or both get wrong add no noise, so two nearly equal models are told apart on far
    fewer questions than two independent samples need."""
    diffs = [int(a) - int(b) for a, b in zip(mine, theirs)]
    n = len(diffs)
    mean = sum(diffs) / n
    return math.sqrt(max(sum(d * d for d in diffs) / n - mean * mean, 0.0) / n)


def verdict(row: dict, reference: dict, bar: float, size_ok: bool = True) -> dict:
    """`met` where the size is within its bar and every metric reaches `bar` of fp32's; `missed` where the size is not,
    or a metric falls short by more than two standard errors (or has no count to judge it by); else `within noise`.
    `short` lists the metrics below their bar."""
    short = {}
    for metric in metric_names(reference):
        if metric.startswith("bundled_") or not reference[metric]:
            continue  # the fresh questions stand for the bundled ones; a 0 has no share
        gap, se = shortfall(row, reference, metric, bar)
        if gap > 1e-9: short[metric] = dict(below_bar_by=round(gap, 4), standard_error=None if se is None else round(se, 4))
    beyond = any(s["standard_error"] is None or s["below_bar_by"] > 2 * s["standard_error"] for s in short.values())
    name = "missed" if beyond or not size_ok else "within noise" if short else "met"
    return dict(verdict=name, short=short)


def lowest_share(row: dict) -> float | None:
    values = [v for v in row["shares"].values() if v is not None]
    return min(values) if values else None


def goals(rows: list[dict]) -> dict:
    "The goals' bars, checked against the measured rows, each with a verdict that counts the questions scored."
    by = {r["recipe"]: r for r in rows}
    reference, out = by["fp32"], {}
    for recipe in INT8:
        if recipe in by:
            row = by[recipe]
            out[recipe] = dict(size_share=round(row["size_share"], 3), lowest_metric_share=lowest_share(row),
                               met=row["size_share"] <= 0.30 and (lowest_share(row) or 0) >= 0.99,
                               **verdict(row, reference, 0.99, size_ok=row["size_share"] <= 0.30))
    if "fp32, 12 experts" in by:
        row = by["fp32, 12 experts"]
        out["12 of 16 experts"] = dict(lowest_metric_share=lowest_share(row), met=(lowest_share(row) or 0) >= 0.97,
                                       **verdict(row, reference, 0.97))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run, stage or checkpoint directory (the latest checkpoint is used)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, default=50, help="validation batches per loss/retrieval metric")
    p.add_argument("--answers", type=int, default=64, help="questions scored per QA task")
    p.add_argument("--route-batches", type=int, default=12, help="validation batches routed to measure expert use")
    p.add_argument("--questions", help="a {task} pattern of fresh val questions to score every recipe on as well")
    p.add_argument("--out", default="bench/results/compress_tiny_cpu.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    device = torch.device(args.device)
    trained, cfg, ckpt = load_trained(args.run, device)
    batch = next(iter(build_loader(cfg, "val", {"vqa": 0.5, "audio_qa": 0.5}, batch_size=8, num_workers=0)))
    routed = [to_device(b, device) for b in build_loader(cfg, "val", {s: 1.0 for s in QA_SOURCES}, batch_size=16,
                                                         num_workers=0)][:args.route_batches]
    load = expert_load(trained, routed)
    rows, out_dir = [], Path(tempfile.mkdtemp())
    recipes = [r for r in RECIPES if r != "int4_weight" or device.type == "cuda"]
    for recipe in recipes:
        print(f"measuring {recipe} ...", flush=True)
        model = compress(copy.deepcopy(trained), recipe)
        row = measure(model, cfg, recipe, batch, out_dir, batches=args.batches, answers=args.answers)
        rows.append(with_fresh(row, fresh_answers(model, cfg, args.questions)) if args.questions else row)
    n_experts = load.shape[-1]
    for n in (12, 8, 4):
        if n >= n_experts: continue
        print(f"measuring {n} experts ...", flush=True)
        keep = experts_to_keep(load, n)
        model = prune_experts(copy.deepcopy(trained), keep)
        row = measure(model, cfg, f"fp32, {n} experts", batch, out_dir, keep, batches=args.batches, answers=args.answers)
        rows.append(with_fresh(row, fresh_answers(model, cfg, args.questions)) if args.questions else row)
    rows = with_shares(rows)
    command = "python bench/compress.py " + " ".join(a for a in sys.argv[1:])
    result = dict(command=command, commit=git_commit(), device=torch.cuda.get_device_name() if device.type == "cuda"
                  else "cpu", preset=getattr(cfg, "preset", None), checkpoint=str(ckpt.relative_to(ROOT))
                  if ckpt.is_relative_to(ROOT) else ckpt.name, rows=rows, goals=goals(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    for row in rows:
        print(f"{row['recipe']:<20} size {row['size_share']:.2f}  lowest metric share {lowest_share(row)}")
    print(json.dumps(result["goals"], indent=1))


if __name__ == "__main__":
    main()
