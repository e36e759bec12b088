"""diagnose: each symptom named with its step on synthetic metrics.jsonl files, nothing on a healthy one, and a real
broken run (lr 0.3, no warmup) caught at the step its gradient norm exploded."""
import json
import os
from pathlib import Path

import torch

from r1_scratch.config import apply_overrides, get_preset, with_data_root
from r1_scratch.model import R1Model
from r1_scratch.trainer import JsonLines, Trainer, lm_stage
from r1_scratch.troubleshoot import diagnose

REPO = Path(__file__).resolve().parent.parent
os.environ["R1_NO_PROGRESS"] = "1"


def healthy_rows(steps=16):
    return [dict(step=s, loss=7.0 - 0.1 * s, lr=3e-4, grad_norm=2.0 + 0.1 * (s % 3), targets=100, seconds=0.2,
                 data_seconds=0.01, moe_imbalance=2.0, moe_dropped=0, moe_dead=0) for s in range(1, steps + 1)]


def write_stage(run, rows, summary=None, stage="sft"):
    folder = run / stage
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps(summary if summary is not None else {"data_wait_share": 0.05}))
    return run


def test_healthy_run_has_no_findings(tmp_path):
    assert diagnose(write_stage(tmp_path, healthy_rows())) == []


def test_nan_names_its_step(tmp_path):
    rows = healthy_rows()
    rows[6]["loss"] = float("nan")  # json writes NaN, and reads it back
    found = diagnose(write_stage(tmp_path, rows))
    assert found[0].symptom == "loss is not finite" and "step 7" in found[0].evidence and found[0].stage == "sft"


def test_gradient_spike_names_its_step(tmp_path):
    rows = healthy_rows()
    rows[9]["grad_norm"] = 300.0
    found = [f for f in diagnose(write_stage(tmp_path, rows)) if f.symptom == "gradient-norm spikes"]
    assert len(found) == 1 and "step 10: 300.0" in found[0].evidence


def test_dead_experts_rising_loss_starving_loader_and_skipped_records(tmp_path):
    rows = [dict(r, loss=5.0 + 0.2 * r["step"], moe_imbalance=8.0, moe_dead=27) for r in healthy_rows()]
    summary = {"data_wait_share": 0.6, "skipped_records": {"decode": 3}}
    symptoms = {f.symptom: f for f in diagnose(write_stage(tmp_path, rows, summary))}
    assert set(symptoms) == {"router collapse", "loss rising", "loader starving the step", "corrupt records skipped"}
    assert "27 dead experts" in symptoms["router collapse"].evidence and "60%" in symptoms["loader starving the step"].evidence


def test_flat_loss_and_a_stage_without_summary(tmp_path):
    rows = [dict(r, loss=7.0) for r in healthy_rows()]
    folder = write_stage(tmp_path, rows) / "sft"
    (folder / "summary.json").unlink()
    symptoms = [f.symptom for f in diagnose(tmp_path)]
    assert symptoms == ["loss flat", "stopped before its summary"]


def test_real_run_too_hot_is_caught_at_its_step(tmp_path):
    cfg = with_data_root(apply_overrides(get_preset("tiny"), ["train.wandb=disabled", "train.log_every=1",
                                                             "train.ckpt_every=0", "train.warmup_steps=0",
                                                             "stages.sft.lr=0.3"]), REPO)
    torch.manual_seed(0)
    trainer = Trainer(R1Model(cfg.model), lm_stage(cfg, "sft", steps=5, grad_accum=1), cfg, tmp_path / "sft",
                      callbacks=[JsonLines()])
    trainer.fit(resume=False)
    rows = trainer.history
    assert {"loss", "grad_norm", "lr", "moe_imbalance", "moe_dead", "data_seconds", "seconds"} <= set(rows[0])
    spikes = [f for f in diagnose(tmp_path) if f.symptom == "gradient-norm spikes"]
    worst = max(rows[2:], key=lambda r: r["grad_norm"])
    assert spikes and f"step {rows[2]['step']}:" in spikes[0].evidence and worst["grad_norm"] > 1000
