"""All three training stages of a preset through the launch on this machine's GPU(s), then every metric of the
evaluation entry point on the validation split: what `small` reaches on one GPU.

    python bench/stages_gpu.py [--preset small] [--gpus 1] [--scale K] [--val-draws K [--score-checkpoints]] [--out FILE] [key=value ...]

Two runs side by side on a 2-GPU machine: grow the data once (--grow-only), then start each run with its own
CUDA_VISIBLE_DEVICES, --runs and --out (and --detach); a complete growth of the same scale in --data is reused.
Several stage-3 settings on one shared stage 1-2: train `--stages pretrain align` once (no evaluation without stage 3), copy
<runs>/stages-<preset> into each one's --runs, and start each with --resume: its JSON marks the stages it reused.

--scale K first generates K independent draws of the bundled train split with the course's own generator (seeds
0..K-1, so K times the records, 4K shards per source) into --data, in parallel on every core, and trains on that:
the bundled 2,760 train records are too few for a 154M-parameter model (it overfits them within minutes). The
val split stays the bundled one, so scores compare across runs. Sources with speech need espeak-ng's library,
which the espeakng-loader wheel brings (a requirement of the package; a machine with no network installs the wheel
file, fetched elsewhere with `pip download espeakng-loader==0.2.4`). Without it only the silent sources grow; a
complete growth with speech (a --grow-only call where the library loads) is reused by later calls without it, not
regrown.

Targets: retrieval R@1 >= 0.9 both ways, visual QA >= 0.9, audio QA >= 0.8, in a run of about 20 min.
The JSON holds the exact command, the wall time of each stage, each stage's summary and the evaluation; it is
written after training and again after the evaluation. Where stage 3 trains an encoder, each retrieval target also
gets the final model's R@1 (`reached_final_model`). --train-answers also scores up to 64 questions per task of the
train split it was tuned on (`train_answers`): a kind of question that fails there too was never learned, rather
than not generalised. --detach runs everything in a new session writing a log, for machines whose single command is
shorter than the run, and prints the run's process id: the run has ended when that process is gone or a zombie;
tail <runs>/stages-<preset>/*/metrics.jsonl to watch it. Options and key=value overrides may come in any order.
--val-draws K also scores the final model on K fresh draws of the val questions (60 visual and 40 spoken each, in
<data>-questions; none of them trained on), as `more_questions` and each QA target's `reached_more_questions`: the
bundled 60 visual questions give +-0.06 and 4 to 15 per kind. --score-checkpoints (with --val-draws and
train.ckpt_every=N) also scores stage 3's intermediate checkpoints on those questions while it trains, as `checkpoints`
(written as each is scored): the curve of one schedule, at some cost to stage 3's speed.
Measured on one H200 (--scale 16): growing the data 38-44 s (x64: 80 s), stage 1 50-66 s, stage 2 140-214 s, stage 3 594 s at
8192-token micro-batches and 432 s at the 32768 the preset now uses, then the evaluation (~1 min). Stage 3 waits
for the loader 2% of its time: its bottleneck is the step (bench/train_gpu.py).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from r1_scratch.config import load_config

TARGETS = {"image_t2x_R@1": 0.9, "image_x2t_R@1": 0.9, "audio_t2x_R@1": 0.9, "audio_x2t_R@1": 0.9,
           "vqa_accuracy": 0.9, "audio_qa_accuracy": 0.8}
KEEP = ("steps", "first_loss", "last_loss", "seconds", "steady_tokens_per_s", "model_tflops_per_s", "skipped_records")


SILENT = ("scenes", "digits", "text", "reasoning", "vqa", "problems")  # sources without speech: no espeak-ng needed
HERE = Path(__file__).resolve().parent


def speech_available() -> bool:
    "Whether espeak-ng's library loads and starts here (the espeakng-loader wheel): the sources with speech need it."
    from r1_scratch.samples import require_espeak
    try:
        require_espeak()
    except RuntimeError:
        return False
    return True


def grow_chunk(job: tuple) -> int:
    "One (out, source, records, seed[, split]) job: a fresh draw of a source's split, its shards numbered by seed."
    import torch
    from r1_scratch.samples import SHARDS, build_source, write_source
    out, source, n, seed, split = (*job, "train")[:5]
    torch.set_num_threads(1)
    write_source(Path(out), source, split, build_source(source, split, n, seed),
                 first_shard=seed * SHARDS[split], first_key=seed * n)
    return n


def grow_data(out: Path, scale: int, sources: list[str] | None = None) -> dict:
    """data_samples/ copied to `out`, its train split replaced by `scale` independent draws of `sources` (default:
    every source it can make here); the others keep the bundled shards, repeated."""
    from multiprocessing import get_context
    from r1_scratch.samples import SHARDS, SOURCES
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(HERE.parent / "data_samples", out)
    sources = sources or default_sources()
    for source in sources:
        for old in (out / "train").glob(f"{source}-*.tar"): old.unlink()
    jobs = [(str(out), s, SOURCES[s][0], seed) for s in sources for seed in range(scale)]
    jobs.sort(key=lambda j: -SOURCES[j[1]][0])  # long jobs first
    with get_context("spawn").Pool(os.cpu_count()) as pool: pool.map(grow_chunk, jobs, chunksize=1)
    per = SHARDS["train"]
    for source in set(SOURCES) - set(sources):  # not generated here: the bundled shards, repeated, so one pattern fits all
        for seed in range(1, scale):
            for s in range(per): shutil.copy(out / "train" / f"{source}-{s:06d}.tar", out / "train" / f"{source}-{seed * per + s:06d}.tar")
    grown = {s: n * (scale if s in sources else 1) for s, (n, _) in SOURCES.items()}
    (out / "grown.json").write_text(json.dumps(dict(scale=scale, sources=sorted(sources), records=grown)))  # last: marks it complete
    return grown


def default_sources() -> list[str]:
    "Every source where espeak-ng's library loads, else the silent ones."
    from r1_scratch.samples import SOURCES
    return list(SOURCES) if speech_available() else list(SILENT)


def grow_questions(out: Path, draws: int) -> str:
    """Draws 1..`draws` of the val split of the QA sources into `out`/val (draw 0 is the bundled val split, which the
    launch's own evaluation reads): 60 visual and 40 spoken questions a draw. Their {task} shard pattern."""
    from multiprocessing import get_context
    from r1_scratch.samples import SHARDS, SOURCES
    sources = ["vqa", "audio_qa"] if speech_available() else ["vqa"]
    marker, pattern = out / "draws.json", f"{out}/val/{{task}}-{{{SHARDS['val']:06d}..{SHARDS['val'] * (draws + 1) - 1:06d}}}.tar"
    if marker.exists() and covers(json.loads(marker.read_text()), "draws", draws, sources): return pattern  # grown before
    staging = out.with_name(f"{out.name}.{os.getpid()}")  # grown aside, then renamed: a run beside this one never reads half
    (staging / "val").mkdir(parents=True)
    jobs = [(str(staging), s, SOURCES[s][1], seed, "val") for s in sources for seed in range(1, draws + 1)]
    with get_context("spawn").Pool(os.cpu_count()) as pool: pool.map(grow_chunk, jobs, chunksize=1)
    (staging / "draws.json").write_text(json.dumps(dict(draws=draws, sources=sources)))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return pattern


def grown_before(out: Path, scale: int, sources: list[str] | None = None) -> dict | None:
    "The record counts of a complete earlier growth of `scale` draws of `sources` in `out` (runs can share one), else None."
    marker = out / "grown.json"
    if not marker.exists(): return None
    done = json.loads(marker.read_text())
    return done["records"] if covers(done, "scale", scale, sources or default_sources()) else None


def covers(done: dict, size_key: str, size: int, sources: list[str]) -> bool:
    """Whether an earlier growth (its marker `done`) is of this size and holds at least these sources. More is fine:
    data grown where espeak-ng's library loaded (speech too) serves a later call without it, which must not regrow it silent-only."""
    return done.get(size_key) == size and set(done.get("sources", [])) >= set(sources)


def shard_pattern(folder: Path, split: str) -> str:
    "A {task} pattern over every shard of `split` in `folder` (the last shard number of the largest source)."
    last = max(int(p.stem.rsplit("-", 1)[1]) for p in (folder / split).glob("*.tar"))
    return f"{folder}/{split}/{{task}}-{{000000..{last:06d}}}.tar"


def score_answers(target: str, questions: str, env: dict) -> dict:
    "The evaluation entry point's QA answers of checkpoint or run `target` on every one of the `questions`."
    ev = subprocess.run([sys.executable, "-m", "r1_scratch.launch", "--eval", target, "--shards", questions,
                         "--batches", "1", "--answers", "100000"], capture_output=True, text=True, env=env)
    return json.loads(ev.stdout)["answers"] if not ev.returncode else {"error": ev.stderr[-3000:]}


def intermediate_checkpoints(stage_dir: Path) -> dict[int, Path]:
    "A stage's complete checkpoints by step, but its last one (the final model, which the closing evaluation scores)."
    found = {}
    for meta_path in (stage_dir / "checkpoints").glob("step_*/meta.json"):
        try: meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError): continue  # rotated away while we read it
        if meta["step"] < meta["config"]["stages"][meta["stage"]]["steps"]: found[meta["step"]] = meta_path.parent
    return found


def score_while_training(train: subprocess.Popen, stage_dir: Path, questions: str, env: dict, save) -> list[dict]:
    """While `train` runs, score each new intermediate checkpoint of stage 3 on the fresh `questions`, beside the
    training on the same GPU(s), and `save(scores)` after each, so a run cut short keeps its curve; once more after it
    ends, for one written at the very end. Points of one schedule: step 560 of a 1,120-step cosine is not a 560-step run.
    A checkpoint rotated away (train.keep_last) before its turn is left out."""
    scores, done = [], False
    while not done:
        done = train.poll() is not None
        for step, path in sorted(intermediate_checkpoints(stage_dir).items()):
            if step in {s["step"] for s in scores}: continue
            scores.append(dict(step=step, answers=score_answers(str(path), questions, env)))
            save(scores)
        if not done: time.sleep(10)
    return scores


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--out", default="bench/results/stages_small_h200.json")
    p.add_argument("--runs", default="/tmp/r1_stage_runs")
    p.add_argument("--scale", type=int, default=1, help="train on K x the bundled train records (generated first)")
    p.add_argument("--data", default="/tmp/r1_data_big", help="where --scale writes the data")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--grow-only", action="store_true", help="generate the --scale data, then stop (runs after it reuse it)")
    p.add_argument("--train-answers", action="store_true", help="also score the questions of the train split (can it fit them?)")
    p.add_argument("--val-draws", type=int, default=0, metavar="K",
                   help="also score K fresh draws of the val questions (60 visual + 40 spoken each): `more_questions`")
    p.add_argument("--score-checkpoints", action="store_true",
                   help="with --val-draws: also score stage 3's intermediate checkpoints (train.ckpt_every) on those "
                   "questions while it trains: `checkpoints`")
    p.add_argument("--detach", metavar="LOG", help="run in a new session, output to LOG, and return at once")
    p.add_argument("--stages", nargs="+", help="train only these stages (the launch's --stages), naming every earlier "
                   "stage too: one not named is not loaded, also with --resume; without sft no evaluation")
    p.add_argument("--resume", action="store_true",
                   help="keep <runs>/stages-<preset> and reuse its finished stages (a copy of a shared stage 1-2 run)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()  # key=value overrides may sit between options
    if args.stages:  # --stages takes every word after it: key=value words are overrides (as in the launch)
        args.overrides += [s for s in args.stages if "=" in s]
        args.stages = [s for s in args.stages if "=" not in s]
    if args.val_draws < 0: p.error(f"--val-draws must be 0 or more, got {args.val_draws}")
    if args.score_checkpoints and not args.val_draws: p.error("--score-checkpoints scores on the --val-draws questions: give --val-draws K")
    if args.grow_only and args.scale < 2 and not args.val_draws:
        p.error("--grow-only needs --scale 2 or more (scale 1 is the bundled data), or --val-draws")
    if args.detach and not os.environ.get("R1_STAGES_DETACHED"):  # the child runs the same argv, and must not detach
        with open(args.detach, "w") as log:
            child = subprocess.Popen([sys.executable, *sys.argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "R1_STAGES_DETACHED": "1"})
        print(child.pid)  # for a watcher: the run has ended when this process is gone or a zombie (`ps -o stat`)
        return
    name = f"stages-{args.preset}"
    data = []
    grown, grow_seconds = {}, None  # None: nothing grown by this call
    if args.scale > 1:
        t0 = time.perf_counter()
        grown = grown_before(Path(args.data), args.scale)
        if grown: print(f"reusing the x{args.scale} train data in {args.data}", flush=True)
        else:
            grown = grow_data(Path(args.data), args.scale)
            grow_seconds = round(time.perf_counter() - t0, 1)
            print(f"grew train data x{args.scale} in {grow_seconds:.0f} s: {grown}", flush=True)
        data = [f"data.train={shard_pattern(Path(args.data), 'train')}", f"data.val={shard_pattern(Path(args.data), 'val')}",
                f"data.tokenizer={args.data}/tokenizer.json"]
    questions = grow_questions(Path(f"{args.data}-questions"), args.val_draws) if args.val_draws else None
    if args.grow_only: return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
           "r1_scratch/launch.py", "--preset", args.preset, "--name", name, *([] if args.resume else ["--fresh"]),
           *(["--stages", *args.stages] if args.stages else []), f"train.out_dir={args.runs}",
           "train.wandb=disabled", *data, *args.overrides]
    env = {**os.environ, "R1_NO_PROGRESS": "1"}
    run = Path(args.runs) / name
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(command=" ".join(["python", *sys.argv]), commit=commit or None, launch=" ".join(cmd[2:]),
                  preset=args.preset, gpus=args.gpus, scale=args.scale, train_records=grown, grow_seconds=grow_seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    def save_checkpoint_scores(scores):
        result["checkpoints"] = dict(shards=questions, scores=scores)
        Path(args.out).write_text(json.dumps(result, indent=1))
    t0, started = time.perf_counter(), time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files, not pipes: nothing blocks
        train = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        if args.score_checkpoints: score_while_training(train, run / "sft", questions, env, save_checkpoint_scores)
        train.wait()
        out.seek(0); err.seek(0)
        stdout, stderr = out.read(), err.read()
    result["train_seconds"] = round(time.perf_counter() - t0, 1)  # with --score-checkpoints, slowed by the scoring beside it
    print(stdout[-4000:], stderr[-3000:], sep="\n", flush=True)
    if train.returncode:
        result["error"] = stderr[-3000:]
    stages = {}
    for stage in ("pretrain", "align", "sft"):
        path = run / stage / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            stages[stage] = {k: summary.get(k) for k in KEEP} | {k: v for k, v in summary.items() if k.startswith("val_")}
            if path.stat().st_mtime < started: stages[stage]["reused"] = True  # --resume: trained by the run copied
    result["stages"] = stages
    sft = stages.get("sft", {})
    reached = {**{k[4:]: v for s in stages.values() for k, v in s.items() if "R@1" in k},
               **{k[4:]: v for k, v in sft.items() if k.endswith("_accuracy")}}
    result["targets"] = {k: dict(target=v, reached=reached.get(k), met=(reached.get(k) or 0) >= v) for k, v in TARGETS.items()}
    Path(args.out).write_text(json.dumps(result, indent=1))  # now, in case the evaluation runs out of time
    print(json.dumps(result["targets"]), flush=True)
    if not train.returncode and "sft" in stages:
        ev = subprocess.run([sys.executable, "-m", "r1_scratch.launch", "--eval", str(run), "--batches", str(args.eval_batches)],
                            capture_output=True, text=True, env=env)
        if ev.returncode: result["eval_error"] = ev.stderr[-3000:]
        else:
            metrics = json.loads(ev.stdout)
            result["eval"] = metrics
            for key, target in result["targets"].items():  # stage 3 may train an encoder: retrieval of the final model
                if "R@1" in key: target["reached_final_model"] = metrics.get("retrieval", {}).get(key)
        if args.train_answers:  # can the model answer the questions it was tuned on? (fitting vs generalising)
            train_pattern = load_config(run / "config.yaml").data.train  # the launch's own, overrides included
            ev = subprocess.run([sys.executable, "-m", "r1_scratch.launch", "--eval", str(run), "--shards", train_pattern,
                                 "--batches", "2"], capture_output=True, text=True, env=env)
            result["train_answers"] = json.loads(ev.stdout)["answers"] if not ev.returncode else {"error": ev.stderr[-3000:]}
        if questions:  # 60 val questions per kind of task give +-0.06: score many more, none of them trained on
            more = score_answers(str(run), questions, env)
            result["more_questions"] = dict(shards=questions, draws=args.val_draws, answers=more)
            for task in ("vqa", "audio_qa"):
                if task in more: result["targets"][f"{task}_accuracy"]["reached_more_questions"] = more[task]["accuracy"]
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result.get(k) for k in ("train_seconds", "targets")}, indent=1))


if __name__ == "__main__":
    main()
