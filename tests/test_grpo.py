"""Stage 4 (GRPO) as a user meets it: the advantage and loss maths on hand-computed cases, each switch; the reward
checker on good and bad answers; the stage through the launch on tiny, resumed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1_scratch.grpo import (average_tokens, clipped_objective, grpo_loss, grpo_options, group_advantages,
                             informative_groups, k3_kl, score_answer, think_format)

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "R1_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
GRPO = ["train.wandb=disabled", "train.log_every=1", "train.ckpt_every=1", "stages.grpo.batch_size=2",
        "stages.grpo.options={group_size: 2, max_new_tokens: 4, answer_samples: 2, updates_per_rollout: 2}"]


def test_checker_rewards_the_exact_answer_and_the_format():
    good = "<think>Step 1: 3 * 4 = 12.</think> Answer: 12"
    assert score_answer(good, "12") == dict(correct=True, format=True, reward=1.1)
    assert score_answer(good, "13", format_weight=0.5)["reward"] == 0.5
    assert score_answer("Step 1: 3 * 4 = 12. Answer: 12", "12") == dict(correct=True, format=False, reward=1.0)
    assert score_answer("<think>12</think>", "12")["reward"] == 0.0                 # no "Answer:" at all
    assert score_answer("Answer: 12 <think>x</think>", "12")["format"] is False      # think after the answer
    assert score_answer("<think>x</think> Answer: 12. Answer: 13", "12")["correct"] is False  # the last answer counts
    assert think_format("Step 1: a. Step 2: b. Answer: 3", last_steps=1) == "<think>Step 2: b.</think> Answer: 3"


def test_advantages_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25])
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], centred)       # Dr. GRPO: no std
    torch.testing.assert_close(group_advantages(rewards, 4)[:4], centred / (0.5 + 1e-4))      # std of (1,0,0,0) = 0.5
    assert group_advantages(rewards, 4)[4:].abs().max() == 0
    assert informative_groups(rewards, 4).tolist() == [True] * 4 + [False] * 4                 # DAPO keeps group 1


def test_clip_and_clip_higher():
    logp, old = torch.log(torch.tensor([[0.6, 0.35]])), torch.log(torch.tensor([[0.4, 0.5]]))  # ratios 1.5, 0.7
    loss, active = clipped_objective(logp, old, torch.tensor([2.0]))
    torch.testing.assert_close(loss, torch.tensor([[-2.4, -1.4]]))          # 1.2 * 2 clipped; 0.7 * 2 (min)
    assert active.tolist() == [[True, False]]
    loss, _ = clipped_objective(logp, old, torch.tensor([2.0]), clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-2.56, -1.4]]))         # DAPO: up to 1.28
    loss, active = clipped_objective(logp, old, torch.tensor([-1.0]))
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8]]))            # 0.7 clipped below at 0.8
    assert active.tolist() == [[False, True]]


def test_token_averages():
    per_token = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert average_tokens(per_token, mask, "sequence", 5).item() == pytest.approx((2 + 1) / 2)
    assert average_tokens(per_token, mask, "token", 5).item() == pytest.approx(5 / 4)
    assert average_tokens(per_token, mask, "constant", 5).item() == pytest.approx(5 / 10)
    with pytest.raises(ValueError, match="loss_average"):
        average_tokens(per_token, mask, "mean", 5)


def test_k3_and_the_whole_loss():
    logp, ref = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.2]]))
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([[0.5 - torch.log(torch.tensor(0.5)) - 1, 0.0]]))
    mask = torch.tensor([[True, True]])
    loss, m = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0]), mask, beta=0.1)
    kl = (0.5 - torch.log(torch.tensor(0.5)) - 1) / 2
    assert loss.item() == pytest.approx(-1.0 + 0.1 * kl.item(), abs=1e-6)
    assert m["kl"].item() == pytest.approx(kl.item(), abs=1e-6) and m["clip_fraction"].item() == 0


def test_options_are_checked():
    assert grpo_options({})["group_size"] == 8
    with pytest.raises(ValueError, match="group_sise"):
        grpo_options({"group_sise": 4})
    with pytest.raises(ValueError, match="clip_high"):
        grpo_options({"clip_high": -0.1})
    with pytest.raises(ValueError, match="group_size"):
        grpo_options({"group_size": 1})


def launch(*args):
    out = subprocess.run([sys.executable, "-m", "r1_scratch.launch", *args], capture_output=True, text=True, cwd=REPO,
                         env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_stage_runs_and_resumes_through_the_launch(tmp_path):
    launch("--stages", "grpo", "--name", "rl", f"train.out_dir={tmp_path}", "stages.grpo.steps=2", *GRPO)
    run = tmp_path / "rl"
    first = json.loads((run / "grpo" / "summary.json").read_text())
    assert first["steps"] == 2 and 0 <= first["val_accuracy"] <= 1 and first["val_samples"] == 2
    result = launch("--stages", "grpo", "--name", "rl", f"train.out_dir={tmp_path}", "stages.grpo.steps=4", *GRPO)
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["trained_steps"] == 2        # resumed at step 2, not from scratch
    rows = [json.loads(l) for l in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["answer_length"] <= 4 and 0 <= r["clip_fraction"] <= 1 and r["kl"] >= 0 for r in train_rows)
    report = (run / "report.md").read_text()
    assert "| stage | reward | accuracy | format | answer length | kl | clip fraction | held-out accuracy |" in report
    assert "| grpo |" in result.stdout


def test_bad_option_is_a_clear_launch_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "r1_scratch.launch", "--stages", "grpo", f"train.out_dir={tmp_path}",
                          "stages.grpo.options={loss_average: mean}"], capture_output=True, text=True, cwd=REPO, env=ENV,
                         timeout=300)
    assert out.returncode != 0 and "stages.grpo.options.loss_average" in out.stderr
