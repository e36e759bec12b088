"""Do the scaled position codes let a decoder read shapes? A CPU stand-in for `small`'s visual QA, ~30 min.

    python research/2026-12-03-small-visual-qa/position_gain_proxy.py [--data /tmp/r1_proxy_data] [--out research/2026-12-03-small-visual-qa/position_gain_proxy_cpu.json]

Why: `small`'s stage-2 tokens name each object's shape 0.95 of the time (research/2026-12-03-small-visual-qa/object_probe.py), yet its stage 3
answers "What shape is on the left?" wrongly even on the questions it was tuned on. Until session 10 the decoder
added its sin-cos position codes unscaled, some 35 times the embeddings (10_model). `small` with the scaled codes
needs a GPU; this asks the same question of the tiny preset, made able to see shapes: 64 px images, the conv stem,
hard negatives and 1200 stage-2 steps on 16 fresh draws of the silent sources (own caption 0.86 in
research/2026-12-03-small-visual-qa/hard_negatives_cpu.json), then stage 3 on visual QA alone, twice:

* `scaled`: the model as it is (DecoderInputs.position_gain, learned from the embeddings' scale);
* `unscaled`: the codes added as they were before (the gain bypassed, so the run is the old model).

Each arm is scored on the 60 val questions and on 64 questions of the train split it was tuned on, per kind. The
two arms share the code and seeds, not a checkpoint: each runs all three stages (stage 1 trains the decoder).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ARMS = ("scaled", "unscaled")
SILENT_NEEDED = ["scenes", "digits", "text", "vqa"]  # stage 1 text, stage 2 scenes + digits, stage 3 visual QA


def unscale_positions():
    "Make DecoderInputs add the raw codes, as the model did before the gain (its parameter stays, unused)."
    from r1_scratch.audio import sinusoidal_positions
    from r1_scratch.fusion import DecoderInputs

    def raw_codes(self, positions, length):
        return sinusoidal_positions(length, self.token_embedding.embedding_dim, positions.device)[positions]
    DecoderInputs.position_codes = raw_codes


def launch_args(data: Path, runs: Path, arm: str) -> list[str]:
    return ["--name", arm, "--fresh", f"train.out_dir={runs}", "train.wandb=disabled", "model.image_size=64",
            "model.patch_stem=conv", "stages.align.steps=1200", "stages.align.options.hard_negatives=true",
            f"data.train={data}/train/{{task}}-{{000000..000063}}.tar", "stages.sft.mixture={vqa: 1.0}"]


def run_arm(arm: str, argv: list[str], torchrun: bool) -> subprocess.CompletedProcess:
    "This script as the entry point of the launch (training under torchrun, or an evaluation), for one arm."
    entry = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [sys.executable]
    return subprocess.run([*entry, str(Path(__file__).resolve()), "--arm", arm, "--", *argv], capture_output=True,
                          text=True, env={**os.environ, "R1_NO_PROGRESS": "1"})


def answers(result: dict) -> dict:
    vqa = result["answers"]["vqa"]
    return dict(accuracy=vqa["accuracy"], samples=vqa["samples"], blind=vqa["blind"],
                by_kind={k: [v["accuracy"], v["samples"]] for k, v in vqa["by_kind"].items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/r1_proxy_data", help="where 16 draws of the silent sources are grown")
    p.add_argument("--runs", default="/tmp/r1_proxy_runs")
    p.add_argument("--out", default="research/2026-12-03-small-visual-qa/position_gain_proxy_cpu.json")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run the launch for one arm
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:  # a child: the launch itself, with the old codes for the unscaled arm
        if args.arm == "unscaled": unscale_positions()
        from r1_scratch.launch import main as launch_main
        sys.exit(launch_main([a for a in args.rest if a != "--"]))
    from stages_gpu import grow_data, grown_before
    data, runs = Path(args.data), Path(args.runs)
    t0 = time.perf_counter()
    if not grown_before(data, 16, SILENT_NEEDED): grow_data(data, 16, SILENT_NEEDED)
    result = dict(command="python research/2026-12-03-small-visual-qa/position_gain_proxy.py", what=__doc__.split("\n\n")[2].replace("\n", " "),
                  launch_overrides=" ".join(launch_args(data, runs, "ARM")[4:]), grow_seconds=round(time.perf_counter() - t0, 1),
                  arms={})
    for arm in ARMS:
        t1 = time.perf_counter()
        train = run_arm(arm, launch_args(data, runs, arm), torchrun=True)
        if train.returncode: raise SystemExit(f"{arm}: the launch failed:\n{train.stderr[-3000:]}")
        run = runs / arm
        summaries = {s: json.loads((run / s / "summary.json").read_text()) for s in ("pretrain", "align", "sft")}
        scored = {}
        for split, shards in (("val", []), ("train", ["--shards", f"{data}/train/{{task}}-{{000000..000063}}.tar"])):
            ev = run_arm(arm, ["--eval", str(run), "--batches", "2", *shards], torchrun=False)
            if ev.returncode: raise SystemExit(f"{arm}: the evaluation failed:\n{ev.stderr[-3000:]}")
            scored[split] = answers(json.loads(ev.stdout))
        result["arms"][arm] = dict(
            seconds=round(time.perf_counter() - t1, 1),
            stage1_val_decoder_lm=summaries["pretrain"].get("val_decoder_lm"),
            stage2_val={k[4:]: v for k, v in summaries["align"].items() if k.startswith("val_image")},
            stage3_last_loss=summaries["sft"]["last_loss"], stage3_val_loss=summaries["sft"].get("val_loss"),
            visual_qa=scored)
        print(arm, json.dumps(result["arms"][arm]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
