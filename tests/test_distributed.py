"""FSDP2, activation checkpointing and sharded checkpoints, as a user meets them: torchrun with 2 CPU processes
(gloo) against one process and against DDP, checkpoints that move between world sizes and strategies, kill -9
during an FSDP launch, and the settings that cannot work."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1_scratch.config import ConfigError, apply_overrides, get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.distributed import apply_activation_checkpointing, wrap_model
from r1_scratch.model import R1Model
from r1_scratch.runtime import local_runtime
from r1_scratch.trainer import Checkpoints, load_weights, lm_loss

from test_launch import ENV, REPO, SHORT  # the launch tests' environment and short stages


def torchrun(nproc: int, script: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def train(nproc: int, tmp_path: Path, kind: str, strategy: str, checkpointing: str = "none") -> list[dict]:
    "tests/ddp_train.py: 3 steps of `kind` on fixed global batches; each rank's losses and weight checksum."
    out = tmp_path / f"{kind}-{strategy}-{checkpointing}-{nproc}"
    torchrun(nproc, str(REPO / "tests" / "ddp_train.py"), str(REPO), str(out), "3", kind, strategy, checkpointing)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_fsdp_ranks_equal_one_process_and_ddp(tmp_path):
    one, ddp, fsdp = train(1, tmp_path, "sft", "ddp"), train(2, tmp_path, "sft", "ddp"), train(2, tmp_path, "sft", "fsdp")
    assert fsdp[0]["checksum"] == fsdp[1]["checksum"]  # every rank's gathered weights are the same
    assert fsdp[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5) == ddp[0]["losses"]
    assert fsdp[0]["norm"] == pytest.approx(one[0]["norm"], rel=1e-5)
    assert fsdp[0]["checksum"] == pytest.approx(ddp[0]["checksum"], rel=1e-6)
    assert fsdp[0]["losses"][-1] < fsdp[0]["losses"][0]


@pytest.mark.parametrize("kind", ["pretrain", "align"])
def test_fsdp_ranks_on_different_data_stay_in_step_and_equal_ddp(tmp_path, kind):
    # pretrain: rank 0 holds a text batch (the decoder runs) while rank 1 holds audio (only its encoder runs);
    # align: unequal shares of the pairs. Without the lockstep loss gloo stops on mismatched collectives; without
    # dropping the gradients nobody used, AdamW moves unused weights and the losses part from DDP's.
    ddp, fsdp = train(2, tmp_path, kind, "ddp"), train(2, tmp_path, kind, "fsdp")
    assert fsdp[0]["checksum"] == fsdp[1]["checksum"]
    assert fsdp[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-5)
    assert fsdp[0]["checksum"] == pytest.approx(ddp[0]["checksum"], rel=1e-6)


def test_activation_checkpointing_under_fsdp_changes_no_loss(tmp_path):
    plain, selective = train(2, tmp_path, "sft", "fsdp"), train(2, tmp_path, "sft", "fsdp", "selective")
    assert selective[0]["losses"] == pytest.approx(plain[0]["losses"], rel=1e-6)
    assert selective[0]["checksum"] == pytest.approx(plain[0]["checksum"], rel=1e-7)


@pytest.fixture(scope="module")
def sft_batch():
    cfg = with_data_root(get_preset("tiny"), REPO)
    return cfg, next(iter(build_loader(cfg, "train", {"instruct": 0.5, "vqa": 0.5, "audio_qa": 0.5}, batch_size=6)))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_gradients_and_counts_expert_loads_once(sft_batch, mode):
    cfg, batch = sft_batch
    def run(mode):
        torch.manual_seed(0)
        model = apply_activation_checkpointing(R1Model(cfg.model), mode)
        part, extra, _ = lm_loss(model, batch)
        (part + extra).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return grads, [m._load.tolist() for m in model.moe_layers]
    (plain, plain_loads), (grads, loads) = run("none"), run(mode)
    assert grads.keys() == plain.keys() and len(grads) > 50
    assert max((grads[n] - plain[n]).abs().max().item() for n in plain) < 1e-6
    assert loads == plain_loads and sum(map(sum, loads)) > 0


def resume_run(nproc: int, run: Path, stop_at: int, strategy: str) -> dict:
    "tests/resume_train.py: train (resuming from run/'s latest checkpoint) to step 4 or stop after stop_at."
    torchrun(nproc, str(REPO / "tests" / "resume_train.py"), str(REPO), str(run), str(stop_at), strategy)
    return json.loads((run / "losses0.json").read_text())


def test_sharded_checkpoint_resumes_at_another_world_size_and_strategy(tmp_path):
    whole = resume_run(1, tmp_path / "whole", 4, "ddp")
    assert list(whole) == ["1", "2", "3", "4"]
    # saved by 2 FSDP ranks, resumed in one plain process
    assert list(resume_run(2, tmp_path / "down", 2, "fsdp")) == ["1", "2"]
    assert (tmp_path / "down" / "checkpoints" / "step_000002" / "dcp" / ".metadata").exists()
    assert resume_run(1, tmp_path / "down", 4, "ddp") == {k: whole[k] for k in ("3", "4")}
    # saved by FSDP in one process, resumed on 2 FSDP ranks
    resume_run(1, tmp_path / "up", 2, "fsdp")
    assert resume_run(2, tmp_path / "up", 4, "fsdp") == {k: whole[k] for k in ("3", "4")}


def fsdp_launch(tmp_path: Path, name: str, popen: bool = False):
    args = [str(REPO / "r1_scratch" / "launch.py"), "--name", name, f"train.out_dir={tmp_path}", "stages.sft.steps=8",
            "train.ckpt_every=2", "dist.strategy=fsdp", *SHORT]
    if not popen: return torchrun(2, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sft_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_9_every_process_of(run: Path):
    "SIGKILL every process whose arguments name `run` (torchrun and each of its ranks), at once."
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try: args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError: continue
        if f"train.out_dir={run.parent}" in args and run.name in args: os.kill(int(pid), signal.SIGKILL)


def test_kill_9_during_an_fsdp_launch_then_the_same_command_resumes(tmp_path):
    fsdp_launch(tmp_path, "whole")
    proc = fsdp_launch(tmp_path, "broken", popen=True)
    target = tmp_path / "broken" / "sft" / "checkpoints" / "step_000004" / "meta.json"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_9_every_process_of(tmp_path / "broken")  # torchrun starts its ranks in sessions of their own
    proc.wait()
    assert target.exists() and not (tmp_path / "broken" / "sft" / "summary.json").exists()
    result = fsdp_launch(tmp_path, "broken")
    assert "resumed sft" in result.stderr and "from" in result.stderr
    assert sft_losses(tmp_path / "broken") == sft_losses(tmp_path / "whole")


def test_a_sharded_checkpoint_consolidates_into_the_same_weights(tmp_path):
    resume_run(2, tmp_path / "run", 2, "fsdp")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    out = subprocess.run([sys.executable, "-m", "r1_scratch.launch", "--consolidate", str(ckpt)], capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = get_preset("tiny")
    sharded = R1Model(cfg.model)
    Checkpoints(ckpt.parent).load(ckpt, sharded)
    whole = load_weights(ckpt / "model.safetensors")
    assert whole.keys() == sharded.state_dict().keys()
    assert all(torch.equal(whole[k], v) for k, v in sharded.state_dict().items())
    assert not torch.equal(whole["lm_head.weight"], R1Model(cfg.model).state_dict()["lm_head.weight"])  # trained


@pytest.mark.parametrize("overrides, message", [
    (["dist.strategy=ddp", "dist.cpu_offload=true"], "dist.cpu_offload=true needs dist.strategy=fsdp"),
    (["dist.strategy=fsdp", "train.precision=fp16"], "dist.strategy=fsdp trains in bf16 or fp32"),
    (["dist.strategy=zero3"], "dist.strategy: expected one of 'auto', 'ddp', 'fsdp'"),
    (["train.activation_checkpointing=some"], "train.activation_checkpointing: expected one of 'none', 'full'"),
])
def test_settings_that_cannot_work_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message): apply_overrides(get_preset("tiny"), overrides)


def test_fsdp_alone_on_a_cpu_warns_and_offload_needs_a_gpu():
    cfg = apply_overrides(get_preset("tiny"), ["dist.strategy=fsdp"])
    rt = local_runtime("fp32")
    try:
        with pytest.warns(UserWarning, match="dist.strategy=fsdp in one CPU process shards nothing"):
            wrap_model(R1Model(cfg.model), cfg, rt)
        offload = apply_overrides(cfg, ["dist.cpu_offload=true"])
        with pytest.raises(ValueError, match="dist.cpu_offload=true .* needs GPUs"):
            wrap_model(R1Model(cfg.model), offload, rt)
    finally:
        torch.distributed.destroy_process_group()
