"""The README's main job, and the numbers its table shows: the tiny preset's three stages on the bundled data.

    python bench/main_job.py [--threads 2] [--out bench/results/main_job_cpu.json] [key=value ...]
    python bench/main_job.py --from-run runs/tiny      # summarise a finished run instead of training one

Runs `torchrun --standalone --nproc_per_node=1 r1_scratch/launch.py --name main_job --fresh` (the README's command,
on the CPU unless a GPU is found), then writes one JSON: the command, the commit, the cores it had, per stage the
steps, seconds and seconds per step (the time to compare on a shared machine, where the wall time is inflated), the
losses, and the validation table: retrieval R@1 next to chance, answer accuracy next to the blind guesser, with the
number of questions each accuracy rests on (the validation samples of the task, at most the evaluation's 64).
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK_LABELS = {"vqa": "visual QA", "audio_qa": "audio QA", "reasoning": "reasoning (final answer)"}
PAIR_LABELS = {"image": ("text→image", "image→text"), "audio": ("text→audio", "audio→text")}


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def val_records(task: str) -> int:
    "How many validation samples of `task` the bundled shards hold (one .json member per record)."
    count = 0
    for shard in sorted((ROOT / "data_samples/val").glob(f"{task}-*.tar")):
        with tarfile.open(shard) as tar: count += sum(m.name.endswith(".json") for m in tar.getmembers())
    return count


def stage_row(summary: dict) -> dict:
    keep = ("steps", "first_loss", "last_loss", "seconds")
    row = {k: summary.get(k) for k in keep}
    if summary.get("seconds") and summary.get("trained_steps"):
        row["seconds_per_step"] = round(summary["seconds"] / summary["trained_steps"], 3)
    return row


def results_table(summaries: dict, answer_samples: int) -> list[dict]:
    "One row per metric: value, chance or blind bar, and how many validation items it rests on."
    rows, align, sft = [], summaries.get("align", {}), summaries.get("sft", {})
    for kind, (t2x, x2t) in PAIR_LABELS.items():
        chance = align.get(f"val_{kind}_chance_R@1")
        for direction, label in (("t2x", t2x), ("x2t", x2t)):
            value = align.get(f"val_{kind}_{direction}_R@1")
            if value is not None:
                rows.append(dict(metric=f"retrieval R@1 {label} (after stage 2)", value=value, chance=chance,
                                 items=align.get(f"val_{kind}_pairs")))
    for task, label in TASK_LABELS.items():
        if f"val_{task}_accuracy" in sft:
            rows.append(dict(metric=label, value=sft[f"val_{task}_accuracy"], chance=sft[f"val_{task}_blind"],
                             items=min(answer_samples, val_records(task)), by_kind=sft.get(f"val_{task}_by_kind")))
    return rows


def summarise(run: Path, command: str, wall_seconds: float | None, threads: int | None) -> dict:
    summaries = {}
    for stage in ("pretrain", "align", "sft"):
        path = run / stage / "summary.json"
        if path.exists(): summaries[stage] = json.loads(path.read_text())
    if "sft" not in summaries: raise SystemExit(f"{run} has no finished stage 3 (sft/summary.json): nothing to summarise")
    config = (run / "config.yaml").read_text() if (run / "config.yaml").exists() else ""
    answer_samples = 64  # sft_evaluate's default; a config that sets stages.sft.options.answer_samples changes it
    for line in config.splitlines():
        if line.strip().startswith("answer_samples:"): answer_samples = int(line.split(":")[1])
    return dict(command=command, commit=git_commit(), cpus=os.cpu_count(), torch_threads=threads,
                wall_seconds=wall_seconds, stages={s: stage_row(v) for s, v in summaries.items()},
                results=results_table(summaries, answer_samples))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's choice)")
    p.add_argument("--from-run", help="summarise this finished run directory instead of training")
    p.add_argument("--out", default="bench/results/main_job_cpu.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to the launch")
    args = p.parse_args()
    if args.from_run:
        result = summarise(Path(args.from_run), f"python bench/main_job.py --from-run {args.from_run}", None, args.threads)
    else:
        launch = ["torchrun", "--standalone", "--nproc_per_node=1", "r1_scratch/launch.py", "--name", "main_job", "--fresh",
                  *args.overrides]
        env = {**os.environ, "R1_NO_PROGRESS": "1", "WANDB_MODE": "offline"}
        if args.threads: env["OMP_NUM_THREADS"] = str(args.threads)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch[1:]], cwd=ROOT, env=env, check=True)
        command = "python bench/main_job.py" + "".join(f" {o}" for o in args.overrides)
        result = summarise(ROOT / "runs/main_job", command, round(time.perf_counter() - start, 1), args.threads)
        result["launch"] = " ".join(launch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for row in result["results"]:
        print(f"{row['metric']:<40} {row['value']:.3f}   chance/blind {row['chance']:.3f}   n={row['items']}")


if __name__ == "__main__":
    main()
