"A stage run on its own starts from the weights of the run's latest finished earlier stage."
import json
from pathlib import Path

import torch

from r1_scratch.config import get_preset
from r1_scratch.launch import load_earlier_stage
from r1_scratch.model import R1Model
from r1_scratch.runtime import local_runtime
from r1_scratch.trainer import Checkpoints


def finished_stage(run_dir: Path, name: str, model: torch.nn.Module, step: int):
    "A stage directory as the trainer leaves it: a checkpoint and a summary."
    rt = local_runtime("fp32")
    Checkpoints(run_dir / name / "checkpoints").save(step, model, {}, dict(step=step, stage=name), rt)
    (run_dir / name / "summary.json").write_text(json.dumps(dict(stage=name, steps=step)))


def models(cfg, n):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(R1Model(cfg.model))
    return out


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_grpo_alone_starts_from_stage_3(tmp_path):
    cfg = get_preset("tiny")
    pretrained, tuned, fresh = models(cfg, 3)
    finished_stage(tmp_path, "pretrain", pretrained, 5)
    finished_stage(tmp_path, "sft", tuned, 7)
    assert not same_weights(fresh, tuned)
    assert load_earlier_stage(fresh, cfg, ["grpo"], tmp_path, local_runtime("fp32")) == "sft"
    assert same_weights(fresh, tuned)


def test_an_unfinished_stage_is_not_a_start(tmp_path):
    cfg = get_preset("tiny")
    pretrained, tuned, fresh = models(cfg, 3)
    finished_stage(tmp_path, "pretrain", pretrained, 5)
    finished_stage(tmp_path, "sft", tuned, 7)
    (tmp_path / "sft" / "summary.json").unlink()  # stopped before its end: its weights are not stage 3's result
    assert load_earlier_stage(fresh, cfg, ["grpo"], tmp_path, local_runtime("fp32")) == "pretrain"
    assert same_weights(fresh, pretrained)


def test_the_first_stage_and_an_empty_run_start_fresh(tmp_path):
    cfg = get_preset("tiny")
    (model,) = models(cfg, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_earlier_stage(model, cfg, ["pretrain", "align"], tmp_path, local_runtime("fp32")) is None
    assert load_earlier_stage(model, cfg, ["sft"], tmp_path, local_runtime("fp32")) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
