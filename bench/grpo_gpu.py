"""GRPO (stage 4) measured from a finished stage 3: held-out reasoning, visual QA, audio QA and retrieval before and
after, and the training curves of the grpo stage.

    python bench/grpo_gpu.py [--run runs/stages-small] [--train-sft] [--preset small] [--problems 400] [--steps 200]
                             [--out FILE] [--detach LOG] [key=value ...]

The input is a run directory whose stage 3 (`sft`) is finished, as `bench/stages_gpu.py --runs runs` writes it
(runs/stages-<preset>), or --train-sft first trains the preset's stages 1-3 there through the launch (on the bundled
data; the grown data of stages_gpu.py --scale K gives the stronger stage 3 to start from). The run itself is not
changed: GRPO trains on a copy (`<run>-grpo`, its checkpoint files hard links), which the launch resumes with
`--stages pretrain align sft grpo` and the run's own config.yaml: the three finished stages are loaded, not
retrained (`--stages grpo` alone would start from a fresh model), and GRPO's training data is the preset's usual
train split (the grown one where the run was trained on grown data). key=value overrides go to that launch (e.g.
stages.grpo.options.beta=0 stages.grpo.lr=5e-6; the run's train.warmup_steps applies to GRPO too);
--steps N sets stages.grpo.steps unless an override does. GRPO starts from the sft model as it is, without the
think-format cold start of 16_stage4_grpo (not a stage of the launch): its format reward starts at 0.

Held-out problems: --problems N fresh reasoning problems from the course's generator (`r1_scratch/samples.py`) on
the val split's stream at seed 1000 and up, which no training draw uses (train draws are the train stream at seeds
0..K-1, the val questions of bench/stages_gpu.py the val stream at seeds 1..K), written under runs/. Other seeds
still repeat some problems (the generator's spaces of numbers are small): any problem of the run's train split, and
any repeat, is left out and another drawn, so no held-out problem was trained on; `held_out` counts those left out
per kind (the kinds with few distinct problems lose most: compare by kind).

Scores, before (the sft checkpoint) and after (the grpo checkpoint), with the evaluation entry point
(`python -m r1_scratch.launch --eval`): reasoning accuracy on the held-out problems, and visual QA, audio QA,
retrieval R@1 and reasoning on the val split. Goals: held-out reasoning >= 0.85 after GRPO; visual QA, audio QA and
every retrieval R@1 not falling by more than 0.02. The curves (reward, accuracy, format, answer length, KL, clip
fraction per logged step) are read from the grpo stage's metrics.jsonl into the JSON and drawn in a PNG beside it.
The JSON is written after each phase, so a time limit keeps what finished. --detach runs everything in a new session
writing LOG and prints the process id (for a machine whose single command is shorter than the run).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HELD_OUT_GOAL = 0.85     # held-out reasoning accuracy after GRPO
MAX_DROP = 0.02          # visual QA, audio QA and retrieval may fall by at most this much
HELD_OUT_SEED = 1000     # first generator seed of the held-out problems: far above any training draw
RETRIEVAL_KEYS = ("image_t2x_R@1", "image_x2t_R@1", "audio_t2x_R@1", "audio_x2t_R@1")
CURVE_KEYS = ("reward", "accuracy", "format", "answer_length", "kl", "clip_fraction", "loss")
ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def device_name() -> str:
    "A short name of this machine's accelerator for the output file: h100, h200, another GPU's last word, or cpu."
    import torch
    if not torch.cuda.is_available(): return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for known in ("h200", "h100", "a100", "l40s"):
        if known in name: return known
    return name.split()[-1]


def relative(path) -> str:
    "A path as the JSON shows it: relative to the repository where it lies inside it (no absolute paths committed)."
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def scrub(value):
    "`value` (nested dicts, lists, strings) with this repository's absolute prefix removed: the JSON names no machine."
    if isinstance(value, dict): return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list): return [scrub(v) for v in value]
    if isinstance(value, str): return value.replace(f"{ROOT}/", "")
    return value


def write_problems(out: Path, n: int, exclude: set[str] = frozenset(), max_draws: int = 1000) -> tuple[str, dict]:
    """`n` fresh reasoning problems in `out`/val, drawn from the val split's stream at seeds HELD_OUT_SEED and up (40 a
    draw, as the bundled val split has them), leaving out any in `exclude` (the train split's) and repeats: their
    {task} shard pattern, and what was drawn and left out. Reused where a complete earlier growth had the same `n`
    and `exclude`."""
    from collections import Counter
    from r1_scratch.samples import SHARDS, SOURCES, build_source, write_source
    if n < 1: raise ValueError(f"--problems must be at least 1, got {n}")
    pattern = f"{out}/val/{{task}}-{{000000..{SHARDS['val'] - 1:06d}}}.tar"
    excluded = hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()[:16]
    marker = out / "problems.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("problems") == n and info.get("excluded") == excluded: return pattern, info
    records, seen, dropped, draw = [], set(), Counter(), 0
    while len(records) < n:
        if draw == max_draws: raise RuntimeError(f"{max_draws} draws gave only {len(records)} problems not in training")
        for record in build_source("reasoning", "val", SOURCES["reasoning"][1], HELD_OUT_SEED + draw):
            question = record["json"]["instruction"]
            if question in exclude or question in seen: dropped[record["json"]["kind"]] += 1
            elif len(records) < n: records.append(record)
            seen.add(question)
        draw += 1
    shutil.rmtree(out, ignore_errors=True)
    write_source(out, "reasoning", "val", records)
    info = dict(problems=n, seeds=[HELD_OUT_SEED, HELD_OUT_SEED + draw - 1], excluded=excluded,
                dropped_seen_or_repeated=dict(sorted(dropped.items())),
                kinds=dict(sorted(Counter(r["json"]["kind"] for r in records).items())))
    marker.write_text(json.dumps(info))  # last: marks it complete
    return pattern, info


def shard_questions(pattern: str, task: str = "reasoning") -> list[str]:
    "The instruction of every record of `task` in the shards of a {task} pattern (missing shards are skipped)."
    import webdataset as wds
    found = []
    shards = wds.shardlists.expand_urls(pattern.replace("{task}", task))
    for shard in shards:
        if not Path(shard).exists(): continue
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"): found.append(json.loads(tar.extractfile(m).read())["instruction"])
    return found


def evaluate(target: Path, env: dict, shards: str | None = None, answers: int = 64, batches: int = 20) -> dict:
    "The evaluation entry point's JSON for checkpoint, stage or run `target` (on `shards`, default its val split)."
    cmd = [sys.executable, "-m", "r1_scratch.launch", "--eval", str(target), "--batches", str(batches),
           "--answers", str(answers), *(["--shards", shards] if shards else [])]
    ev = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if ev.returncode: return {"error": ev.stderr[-3000:]}
    return json.loads(ev.stdout)


def scores(val: dict, held_out: dict) -> dict:
    "The compared metrics of one model: held-out reasoning, QA accuracies and retrieval R@1 on the val split."
    answers, retrieval = val.get("answers", {}), val.get("retrieval", {})
    reasoning = held_out.get("answers", {}).get("reasoning", {})
    out = {"held_out_reasoning": reasoning.get("accuracy")}
    for kind, value in reasoning.get("by_kind", {}).items():  # which kinds of problem GRPO helps
        out[f"held_out_reasoning/{kind}"] = value.get("accuracy") if isinstance(value, dict) else value
    for task in ("vqa", "audio_qa", "reasoning"):
        out[f"val_{task}"] = answers.get(task, {}).get("accuracy")
    for key in RETRIEVAL_KEYS: out[key] = retrieval.get(key)
    return out


def compare(before: dict, after: dict) -> dict:
    "Per metric: before, after and the change (None where either is missing)."
    rows = {}
    for key in before.keys() | after.keys():
        b, a = before.get(key), after.get(key)
        rows[key] = dict(before=b, after=a, delta=None if a is None or b is None else round(a - b, 4))
    return dict(sorted(rows.items()))


def goals(table: dict) -> dict:
    """The goals on a compare() table: held-out reasoning >= HELD_OUT_GOAL after; visual QA, audio QA and each
    retrieval R@1 falling by at most MAX_DROP. A metric the evaluation did not give (no audio here) is `met: None`,
    not a failure."""
    out = {}
    row = table.get("held_out_reasoning", {})
    out["held_out_reasoning"] = dict(goal=f">= {HELD_OUT_GOAL}", after=row.get("after"),
                                     met=None if row.get("after") is None else row["after"] >= HELD_OUT_GOAL)
    for key in ("val_vqa", "val_audio_qa", *RETRIEVAL_KEYS):
        row = table.get(key, {})
        delta = row.get("delta")
        met = None if delta is None else delta >= -MAX_DROP - 1e-9  # a fall of exactly MAX_DROP is allowed
        out[key] = dict(goal=f"delta >= -{MAX_DROP}", delta=delta, met=met)
    return out


def read_curves(metrics_path: Path) -> dict:
    "The grpo stage's logged rows as lists per key (step and CURVE_KEYS; a key some row lacks is left out)."
    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "reward" in r]  # training rows; evaluation rows carry val_* keys only
    keys = [k for k in ("step", *CURVE_KEYS) if rows and all(k in r for r in rows)]
    return {k: [round(float(r[k]), 5) for r in rows] for k in keys}


def plot_curves(curves: dict, path: Path, title: str) -> Path | None:
    "Reward (and accuracy), answer length, KL and clip fraction against the step, as one PNG; None without rows."
    if not curves.get("step"): return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("reward", ("reward", "accuracy")), ("answer length (tokens)", ("answer_length",)),
              ("KL to the reference", ("kl",)), ("clip fraction", ("clip_fraction",))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            if key in curves: ax.plot(curves["step"], curves[key], label=key)
        ax.set_xlabel("step")
        ax.set_title(label)
        if len(keys) > 1: ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def link_or_copy(src: str, dst: str) -> str:
    """Hard-link a checkpoint file (never rewritten in place: the copy's finished stages are only read), copy the rest
    (config.yaml and the report are rewritten by the launch, which would change the original through a link)."""
    if "checkpoints" in Path(src).parts:
        try:
            os.link(src, dst)
            return dst
        except OSError: pass  # another file system: copy
    return shutil.copy2(src, dst)


def launch(args_list: list[str], env: dict) -> tuple[int, str, float]:
    "The launch through torchrun on one process per GPU (one on the CPU): return code, stderr tail, seconds."
    import torch
    procs = max(torch.cuda.device_count(), 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "r1_scratch/launch.py", *args_list]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    print(run.stdout[-3000:], run.stderr[-2000:], sep="\n", flush=True)
    return run.returncode, run.stderr[-3000:], round(time.perf_counter() - t0, 1)


def score_phase(result: dict, phase: str, stage_dir: Path, env: dict, problems: str, args) -> dict:
    "Evaluate `stage_dir` on the val split and the held-out problems; record both under `phase` in `result`."
    t0 = time.perf_counter()
    val = evaluate(stage_dir, env, batches=args.eval_batches)
    held = evaluate(stage_dir, env, problems, answers=args.problems, batches=1)
    result[f"eval_seconds_{phase}"] = round(time.perf_counter() - t0, 1)
    result[phase] = dict(val=val, held_out=held)
    failed = [name for name, ev in (("val", val), ("held-out", held)) if "error" in ev]
    if failed: result["error"] = f"the evaluation {phase} GRPO failed on {failed}: see {phase}.*.error"
    return scores(val, held)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run directory with a finished stage 3 (default runs/stages-<preset>)")
    p.add_argument("--preset", default="small")
    p.add_argument("--train-sft", action="store_true", help="first train the preset's stages 1-3 into --run")
    p.add_argument("--problems", type=int, default=400, help="fresh held-out reasoning problems to score")
    p.add_argument("--steps", type=int, default=200, help="GRPO steps (stages.grpo.steps) unless an override sets it")
    p.add_argument("--eval-batches", type=int, default=20, help="LM batches per task of each evaluation")
    p.add_argument("--out", help="default bench/results/grpo_<preset>_<device>.json")
    p.add_argument("--detach", metavar="LOG", help="run in a new session, output to LOG, and return at once")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the GRPO launch (and --train-sft's)")
    args = p.parse_intermixed_args()
    if args.steps < 1: p.error(f"--steps must be at least 1, got {args.steps}")
    if args.problems < 1: p.error(f"--problems must be at least 1, got {args.problems}")
    if args.detach and not os.environ.get("R1_GRPO_DETACHED"):  # the child runs the same argv, and must not detach
        with open(args.detach, "w") as log:
            child = subprocess.Popen([sys.executable, *sys.argv], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "R1_GRPO_DETACHED": "1"})
        print(child.pid)  # the run has ended when this process is gone or a zombie (`ps -o stat`)
        return
    run = Path(args.run or ROOT / "runs" / f"stages-{args.preset}").resolve()
    copy = run.with_name(f"{run.name}-grpo")
    out = Path(args.out or ROOT / "bench/results" / f"grpo_{args.preset}_{device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's r1_scratch
    env = {**os.environ, "R1_NO_PROGRESS": "1", "PYTHONPATH": path}
    result = dict(command=" ".join(["python", *[relative(a) if os.path.isabs(a) else a for a in sys.argv]]),
                  commit=git_commit(), preset=args.preset, device=device_name(), run=relative(run))
    save = lambda: out.write_text(json.dumps(scrub(result), indent=1, ensure_ascii=False) + "\n")

    if args.train_sft:
        code, err, seconds = launch(["--preset", args.preset, "--name", run.name, "--fresh", "--stages", "pretrain",
                                     "align", "sft", f"train.out_dir={run.parent}", "train.wandb=disabled",
                                     *args.overrides], env)
        result["sft_seconds"] = seconds
        if code: result["error"] = f"stages 1-3 failed: {err}"
        save()
        if code: raise SystemExit(result["error"])
    if not (run / "sft" / "summary.json").exists():
        raise SystemExit(f"{run} has no finished stage 3 (sft/summary.json): train it (--train-sft) or give --run")

    t0 = time.perf_counter()
    from r1_scratch.config import load_config
    train = set(shard_questions(load_config(run / "config.yaml").data.train))  # the run's own train split
    problems, info = write_problems(ROOT / "runs" / f"held_out_reasoning_{args.problems}", args.problems, train)
    result["held_out"] = dict(info, train_problems=len(train), seconds=round(time.perf_counter() - t0, 1))
    print(f"held-out problems: {result['held_out']}", flush=True)

    before = score_phase(result, "before", run / "sft", env, problems, args)
    result["scores_before"] = before
    save()
    print(f"before: {before}", flush=True)

    shutil.rmtree(copy, ignore_errors=True)  # a fresh copy: GRPO restarts from the sft checkpoint every time
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("grpo"), copy_function=link_or_copy)
    overrides = list(args.overrides)
    if not any(o.startswith("stages.grpo.steps=") for o in overrides):
        overrides.append(f"stages.grpo.steps={args.steps}")
    code, err, seconds = launch(["--config", str(copy / "config.yaml"), "--name", copy.name, "--stages", "pretrain",
                                 "align", "sft", "grpo", f"train.out_dir={copy.parent}", "train.wandb=disabled",
                                 *overrides], env)
    result["grpo"] = dict(overrides=overrides, seconds=seconds)
    summary_path = copy / "grpo" / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result["grpo"]["summary"] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    if (copy / "grpo" / "metrics.jsonl").exists():
        curves = read_curves(copy / "grpo" / "metrics.jsonl")
        result["curves"] = curves
        png = plot_curves(curves, out.with_suffix(".png"), f"GRPO from stage 3, {args.preset} on {device_name()}")
        result["curves_png"] = relative(png) if png else None
    if code: result["error"] = f"grpo failed: {err}"
    save()
    if code: raise SystemExit(result["error"])

    table = compare(before, score_phase(result, "after", copy / "grpo", env, problems, args))
    result["metrics"] = table
    result["goals"] = goals(table)
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps(dict(metrics=table, goals=result["goals"]), indent=1))


if __name__ == "__main__":
    main()
