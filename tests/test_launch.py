"""The launch command as a user meets it: training, resume after kill -9, torchrun with 2 CPU processes,
evaluation of a checkpoint, and bad input."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1_scratch.samples import AUDIO_QUESTION_KINDS, SCENE_QUESTION_KINDS

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "R1_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
SHORT = ["train.wandb=disabled", "train.log_every=1", "stages.sft.grad_accum=1",
         "stages.sft.options={expert_dropout: 0.3, eval_batches: 2, answer_samples: 4}",
         "stages.pretrain.steps=2", "stages.pretrain.grad_accum=2", "stages.align.steps=2",
         "stages.pretrain.options.eval_batches=1"]
STAGE_DIRS = ["align", "config.yaml", "pretrain", "report.md", "sft"]


def launch(*args, cwd=REPO, check=True, timeout=300):
    out = subprocess.run([sys.executable, "-m", "r1_scratch.launch", *args], capture_output=True, text=True, cwd=cwd,
                         env=ENV, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = launch("--name", "whole", f"train.out_dir={out}", "stages.sft.steps=8", "train.ckpt_every=2", *SHORT)
    return out / "whole", result


def test_launch_trains_and_writes_the_run(unbroken):
    run, result = unbroken
    assert sorted(p.name for p in run.iterdir()) == STAGE_DIRS
    steps = losses(run)
    assert list(steps) == list(range(1, 9)) and steps[8] < steps[1]
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["val_loss"] < 8 and summary["skipped_records"] == {}
    assert (run / "sft" / "training.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert "| sft | 8 |" in report and "| pretrain | 2 |" in report and "| align | 2 |" in result.stdout
    row = next(line for line in report.splitlines() if line.startswith("| sft |")).split("|")
    assert row[7].strip() == f"{summary['data_wait_share']:.0%}"  # the "waiting for data" column
    assert "image R@1 text→image" in report and "(chance 0.0" in report and "vqa accuracy" in report
    shown = re.search(r"vqa by kind: ([^;]+);", report).group(1)  # e.g. "count 0.00, digit 1.00"
    assert {part.split()[0] for part in shown.split(", ")} <= {*SCENE_QUESTION_KINDS, "digit"}
    align = json.loads((run / "align" / "summary.json").read_text())
    assert align["val_image_pairs"] == 180 and align["val_audio_pairs"] == 40  # every captioned val sample
    pretrain = json.loads((run / "pretrain" / "summary.json").read_text())
    assert "val_decoder_lm" in pretrain and "val_text_mlm" not in pretrain  # tiny's stage 1: the decoder's causal LM


def kill_9_at(args: list[str], target: Path, timeout: float = 240) -> int:
    "Start the launch with `args`, SIGKILL it as soon as `target` exists, and return its exit code."
    proc = subprocess.Popen([sys.executable, "-m", "r1_scratch.launch", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_kill_9_then_resume_gives_the_losses_of_an_unbroken_run(unbroken, tmp_path):
    args = ["--name", "broken", f"train.out_dir={tmp_path}", "stages.sft.steps=8", "train.ckpt_every=2", *SHORT]
    target = tmp_path / "broken" / "sft" / "checkpoints" / "step_000004" / "meta.json"
    returncode = kill_9_at(args, target)
    assert target.exists() and returncode == -signal.SIGKILL
    assert not (tmp_path / "broken" / "sft" / "summary.json").exists()  # it really died mid-run
    launch(*args)  # the same command resumes
    whole, _ = unbroken
    assert losses(tmp_path / "broken") == losses(whole)  # bit-exact on CPU (fp32, RNG and data position restored)


def test_a_finished_run_is_reused_not_retrained(unbroken):
    run, _ = unbroken
    before = (run / "sft" / "metrics.jsonl").read_text()
    result = launch("--name", "whole", f"train.out_dir={run.parent}", "stages.sft.steps=8", "train.ckpt_every=2", *SHORT)
    assert "sft (reused)" in result.stdout and "pretrain (reused)" in result.stdout and (run / "sft" / "metrics.jsonl").read_text() == before


def test_eval_prints_every_stage_metric_as_json(unbroken):
    run, _ = unbroken
    result = json.loads(launch("--eval", str(run), "--batches", "2").stdout)
    assert result["step"] == 8 and result["stage"] == "sft"
    lm = result["language_model"]["tasks"]
    assert sorted(lm) == ["audio_qa", "digits", "instruct", "reasoning", "scenes", "speech", "text", "vqa"]
    for task in lm.values():
        assert task["targets"] > 0 and 0 <= task["accuracy"] <= 1 and task["loss"] < 9
    assert set(result["pretrain"]) >= {"decoder_lm", "image_patches", "audio_frames"}  # tiny: no masked-token loss
    retrieval = result["retrieval"]
    assert retrieval["image_pairs"] == 180 and retrieval["audio_pairs"] == 40
    assert all(0 <= retrieval[f"{k}_{d}_R@1"] <= retrieval[f"{k}_{d}_R@5"] <= 1 for k in ("image", "audio") for d in ("t2x", "x2t"))
    assert retrieval["image_chance_R@1"] < 0.05
    assert sorted(result["answers"]) == ["audio_qa", "reasoning", "vqa"]
    assert all(a["samples"] == 40 and 0 <= a["accuracy"] <= 1 for a in (result["answers"][t] for t in ("audio_qa", "reasoning")))
    for task, kinds in {"vqa": (*SCENE_QUESTION_KINDS, "digit"), "audio_qa": AUDIO_QUESTION_KINDS}.items():
        answers = result["answers"][task]
        by_kind = answers["by_kind"]
        assert sorted(by_kind) == sorted(kinds) and sum(k["samples"] for k in by_kind.values()) == answers["samples"]
        overall = sum(k["accuracy"] * k["samples"] for k in by_kind.values()) / answers["samples"]
        assert abs(overall - answers["accuracy"]) < 1e-3  # the kinds split the same answers, nothing lost or counted twice
    one = json.loads(launch("--eval", str(run), "--batches", "1", "--answers", "25",
                            "--shards", str(REPO / "data_samples/val/vqa-{000000..000001}.tar")).stdout)
    assert list(one["language_model"]["tasks"]) == ["all"] and list(one["answers"]) == ["vqa"]
    assert one["answers"]["vqa"]["samples"] == 25 and "skipped" in one["retrieval"]   # no captions among questions
    missing = launch("--eval", str(run.parent / "nothing"), check=False)
    assert missing.returncode == 2 and "no checkpoint under" in missing.stderr


@pytest.mark.parametrize("args, message", [
    (["train.max_step=4"], "unknown key train.max_step; did you mean train.max_steps"),
    (["--stages", "sfd"], "unknown stage(s) ['sfd']"),
    (["stages.align.batch_size=0"], "stages.align.batch_size must be positive, got 0"),
    (["model.n_heads=3"], "model.n_heads=3 does not divide model.d_model=128"),
    (["max_steps"], "'max_steps' is not key=value"),
    (["--eval", "runs/x", "--answers", "0"], "--answers and --batches must be at least 1"),
])
def test_bad_input_is_named(args, message, tmp_path):
    result = launch(f"train.out_dir={tmp_path}", *args, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-1000:]
    assert not any(tmp_path.iterdir())  # nothing started


def run_ddp_script(nproc: int, tmp_path: Path, kind: str = "sft") -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "ddp_train.py"), str(REPO), str(tmp_path / f"{kind}{nproc}"), "3", kind]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads((tmp_path / f"{kind}{nproc}" / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_torchrun_two_cpu_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    one, two = run_ddp_script(1, tmp_path), run_ddp_script(2, tmp_path)
    assert [r["world"] for r in two] == [2, 2]
    assert two[0]["checksum"] == two[1]["checksum"] and two[0]["norm"] == two[1]["norm"]  # identical replicas
    # same global batch: losses and weights agree up to the order of float sums (stated tolerance 1e-5 relative)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    assert two[0]["norm"] == pytest.approx(one[0]["norm"], rel=1e-5)
    assert two[0]["losses"][-1] < two[0]["losses"][0]


@pytest.mark.parametrize("kind", ["align", "align_hard"])
def test_align_across_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, kind):
    # each rank holds 3 or 5 of the 8 pairs; only negatives (and hard negatives) gathered from both ranks
    # reproduce the whole batch
    one, two = run_ddp_script(1, tmp_path, kind), run_ddp_script(2, tmp_path, kind)
    assert two[0]["checksum"] == two[1]["checksum"]
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    assert two[0]["norm"] == pytest.approx(one[0]["norm"], rel=1e-5)
    if kind == "align_hard":  # the hard negatives were there: the first step's loss is not plain alignment's
        plain = run_ddp_script(1, tmp_path, "align")
        assert one[0]["losses"][0] > plain[0]["losses"][0] + 1e-3
        # and in some step one rank held none while the other held some: the case where ranks could diverge
        assert any(min(a, b) == 0 < max(a, b) for a, b in zip(two[0]["hard_rows"], two[1]["hard_rows"])), two


def test_pretrain_ranks_on_different_modalities_stay_identical(tmp_path):
    # step 1: rank 0 trains on text, rank 1 on audio; DDP must still sync every gradient (masks are random per rank,
    # so losses are not compared with one process)
    two = run_ddp_script(2, tmp_path, "pretrain")
    assert two[0]["checksum"] == two[1]["checksum"] and two[0]["norm"] == two[1]["norm"]
    assert all(math.isfinite(x) for x in two[0]["losses"])


def test_torchrun_launch_runs_the_file_directly(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "r1_scratch" / "launch.py"), "--name", "ddp", f"train.out_dir={tmp_path}", "stages.sft.steps=2",
           *SHORT]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)  # any directory
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) on cpu" in out.stdout and len(losses(tmp_path / "ddp")) == 2
    assert (tmp_path / "ddp" / "align" / "summary.json").exists()
