"""The Trainer: accumulation normalised by target tokens, atomic checkpoints, safe loading, NaN stop, precision."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from r1_scratch.config import apply_overrides, get_preset, with_data_root
from r1_scratch.model import R1Model
from r1_scratch import trainer as trainer_module
from r1_scratch.runtime import resolve_precision
from r1_scratch.trainer import CheckpointError, Checkpoints, NonFiniteError, Stage, Trainer, lm_stage, lr_lambda

REPO = Path(__file__).resolve().parent.parent
os.environ["R1_NO_PROGRESS"] = "1"


def toy_cfg(*overrides):
    return apply_overrides(get_preset("tiny"), ["train.wandb=disabled", "train.warmup_steps=1", *overrides])


class Fixed:
    def __init__(self, batches): self.batches = batches
    def __iter__(self): return iter(self.batches)


def toy_stage(batches, grad_accum, steps=1):
    loss = lambda m, b: (((m(b["x"]) - b["y"]) ** 2).sum(), torch.zeros(()), {})
    return Stage("toy", Fixed(batches), loss, lambda b: torch.tensor(len(b["x"])), steps=steps, lr=0.1,
                 grad_accum=grad_accum)


def test_accumulation_is_normalised_by_the_step_target_count(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    b.load_state_dict(a.state_dict())
    cfg = toy_cfg("train.ckpt_every=0")
    # micro-batches of 3 and 7 rows must give the step of one batch of 10
    Trainer(a, toy_stage([{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}], 2), cfg, tmp_path / "a", callbacks=[]).fit()
    Trainer(b, toy_stage([{"x": x, "y": y}], 1), cfg, tmp_path / "b", callbacks=[]).fit()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    # the naive loss / grad_accum would not: it weighs the 3-row micro-batch like the 7-row one
    assert not torch.allclose(a.weight, torch.nn.Linear(3, 1).weight)


def test_schedule_warms_up_then_decays_to_min_ratio():
    assert lr_lambda(0, 4, 20, 0.1) == 0.25 and lr_lambda(3, 4, 20, 0.1) == 1.0
    assert lr_lambda(20, 4, 20, 0.1) == pytest.approx(0.1) and lr_lambda(100, 4, 20, 0.1) == pytest.approx(0.1)


def test_precision_is_checked_against_the_device():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="train.precision=bf16 needs a CUDA GPU"):
        resolve_precision("bf16", torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = with_data_root(toy_cfg("train.ckpt_every=2", "train.keep_last=2",
                                 "stages.sft.options={expert_dropout: 0.3, eval_batches: 1}"), REPO)
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    trainer = Trainer(R1Model(cfg.model), lm_stage(cfg, "sft", steps=6, grad_accum=1), cfg, run, callbacks=[])
    trainer.fit()
    return cfg, run, trainer


def test_checkpoints_rotate_and_hold_everything(tiny_run):
    cfg, run, trainer = tiny_run
    names = [p.name for p in Checkpoints(run / "checkpoints").all()]
    assert names == ["step_000004", "step_000006"]  # keep_last=2
    files = sorted(p.name for p in (run / "checkpoints" / "step_000006").iterdir())
    assert files == ["meta.json", "model.safetensors", "rng_0.pt", "state.pt"]


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny_run, monkeypatch):
    cfg, run, trainer = tiny_run
    def half_written(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(trainer_module, "save_weights", half_written)
    trainer.step = 8
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    checkpoints = Checkpoints(run / "checkpoints")
    assert checkpoints.latest().name == "step_000006"  # the half-written one is not a checkpoint
    model = R1Model(cfg.model)
    state, meta = checkpoints.load(checkpoints.latest(), model)
    assert meta["step"] == 6 and "optimizer" in state
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], trainer.module.state_dict()["lm_head.weight"])


def test_checkpoint_of_another_shape_gets_a_clear_error(tiny_run):
    cfg, run, _ = tiny_run
    other = R1Model(apply_overrides(cfg, ["model.depth=3"]).model)
    with pytest.raises(CheckpointError, match=r"does not fit this model \(\d+ shape mismatch"):
        Checkpoints(run / "checkpoints").load(Checkpoints(run / "checkpoints").latest(), other)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Checkpoints(run / "checkpoints").load(run, other)


def test_checkpoints_load_without_unpickling_objects(tiny_run, tmp_path):
    cfg, run, _ = tiny_run
    import shutil
    evil = tmp_path / "step_000001"
    shutil.copytree(Checkpoints(run / "checkpoints").latest(), evil)

    class Boom:
        def __reduce__(self): return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    (evil / "state.pt").write_bytes(pickle.dumps({"optimizer": Boom()}))
    with pytest.raises(pickle.UnpicklingError):
        Checkpoints(tmp_path).load(evil, R1Model(cfg.model))
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    cfg = with_data_root(toy_cfg("train.ckpt_every=2"), REPO)
    calls = []
    def poisoned(model, batch):
        calls.append(1)
        from r1_scratch.trainer import lm_loss
        loss_sum, extra, m = lm_loss(model, batch)
        return (loss_sum * float("nan") if len(calls) > 3 else loss_sum), extra, m
    trainer = Trainer(R1Model(cfg.model), lm_stage(cfg, "sft", steps=8, grad_accum=1, loss=poisoned), cfg, tmp_path,
                      callbacks=[])
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 4; nothing was saved. Last good checkpoint: .*step_000002"):
        trainer.fit()
    assert [p.name for p in Checkpoints(tmp_path / "checkpoints").all()] == ["step_000002"]


def test_trainable_prefixes_freeze_the_rest_and_unknown_ones_are_named(tmp_path):
    cfg = with_data_root(toy_cfg(), REPO)
    model = R1Model(cfg.model)
    trainer = Trainer(model, lm_stage(cfg, "sft", trainable=["blocks", "lm_head"]), cfg, tmp_path, callbacks=[])
    assert all(p.requires_grad == (n.startswith(("blocks", "lm_head", "inputs.token_embedding")))
               for n, p in model.named_parameters())
    assert len(trainer.params) < len(list(model.parameters()))
    with pytest.raises(ValueError, match="trainable prefix 'decoder' matches no parameter"):
        Trainer(model, lm_stage(cfg, "sft", trainable=["decoder"]), cfg, tmp_path, callbacks=[])


def test_the_last_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    "A run killed (or crashing) in its closing evaluation keeps its trained weights: the checkpoint comes first."
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model = torch.nn.Linear(3, 1)
    def evaluate(m): raise RuntimeError("evaluation died")
    stage = toy_stage([dict(x=x, y=y)] * 3, grad_accum=1, steps=3)
    stage.evaluate = evaluate
    trainer = Trainer(model, stage, toy_cfg("train.ckpt_every=0"), tmp_path / "run", callbacks=[])
    with pytest.raises(RuntimeError, match="evaluation died"): trainer.fit()
    latest = Checkpoints(tmp_path / "run" / "checkpoints").latest()
    assert latest is not None and latest.name == "step_000003"
    fresh = torch.nn.Linear(3, 1)
    Checkpoints(tmp_path / "run" / "checkpoints").load(latest, fresh)
    assert torch.equal(fresh.weight, model.weight)


def test_lr_scale_slows_its_prefix_through_the_schedule_and_a_resume(tmp_path):
    "stages.<name>.lr_scale from the config: the vision encoder at a quarter of the lr after training and after a resume."
    cfg = with_data_root(toy_cfg("train.ckpt_every=2", "stages.sft.trainable=[inputs, blocks, norm, lm_head, encoders.vision]",
                                 "stages.sft.lr_scale={encoders.vision: 0.25}"), REPO)
    torch.manual_seed(0)
    model = R1Model(cfg.model)
    vision = {id(p) for p in model.encoders.vision.parameters()}

    def check(trainer):
        groups = trainer.optimizer.param_groups
        slow = [g for g in groups if g["params"] and all(id(p) in vision for p in g["params"])]
        fast = [g for g in groups if g["params"] and not any(id(p) in vision for p in g["params"])]
        assert len(slow) + len(fast) == sum(1 for g in groups if g["params"])  # no group mixes the two
        assert sum(len(g["params"]) for g in slow) == len(vision)
        assert all(g["lr"] == pytest.approx(0.25 * fast[0]["lr"]) for g in slow) and fast[0]["lr"] > 0

    first = Trainer(model, lm_stage(cfg, "sft", steps=3, grad_accum=1, evaluate=None), cfg, tmp_path, callbacks=[])
    first.fit(); check(first)
    again = Trainer(model, lm_stage(cfg, "sft", steps=4, grad_accum=1, evaluate=None), cfg, tmp_path, callbacks=[])
    assert again.resume() and again.step == 3  # the multipliers come back with the optimizer's state
    check(again)
    again.fit(resume=False); check(again)
    assert again.step == 4
    plain = lm_stage(cfg, "sft", steps=5, grad_accum=1, evaluate=None, lr_scale={})
    with pytest.raises(CheckpointError, match="were the stage's trainable or lr_scale changed"):
        Trainer(model, plain, cfg, tmp_path, callbacks=[]).resume()
    with pytest.raises(ValueError, match="lr_scale prefix 'encoders.visoin' matches no trainable parameter"):
        Trainer(model, lm_stage(cfg, "sft", lr_scale={"encoders.visoin": 0.1}), cfg, tmp_path / "x", callbacks=[])


def test_lr_scale_must_be_positive():
    from r1_scratch.config import ConfigError
    for bad in ("0", "-1", ".inf"):
        with pytest.raises(ConfigError, match="stages.sft.lr_scale multipliers must be positive and finite"):
            toy_cfg(f"stages.sft.lr_scale={{encoders: {bad}}}")


def test_lr_scale_reaches_a_tied_weight_by_either_name():
    "The LM head is the token embedding: a multiplier may name either, and two different ones are refused."
    cfg = toy_cfg()
    model = R1Model(cfg.model)
    params = list(model.parameters())
    from r1_scratch.trainer import make_optimizer
    opt = make_optimizer(params, model, 1e-3, cfg.train, torch.device("cpu"), {"lm_head": 0.5})
    slow = [p for g in opt.param_groups if g["lr"] == pytest.approx(5e-4) for p in g["params"]]
    assert len(slow) == 1 and slow[0] is model.inputs.token_embedding.weight
    with pytest.raises(ValueError, match="several multipliers"):
        make_optimizer(params, model, 1e-3, cfg.train, torch.device("cpu"), {"lm_head": 0.5, "inputs": 0.25})


class Slow(Fixed):
    "A loader that takes `delay` seconds to hand over each batch, like one that cannot keep up."
    def __init__(self, batches, delay): super().__init__(batches); self.delay = delay
    def __iter__(self):
        import time
        for batch in self.batches: time.sleep(self.delay); yield batch


def test_data_wait_share_tells_a_slow_loader_from_a_fast_one(tmp_path):
    torch.manual_seed(0)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(8)]
    cfg = toy_cfg("train.ckpt_every=0")
    def share(loader, name):
        stage = toy_stage([], 2, steps=4); stage.loader = loader
        trainer = Trainer(torch.nn.Linear(3, 1), stage, cfg, tmp_path / name, callbacks=[])
        summary = trainer.fit()
        assert all(0 <= h["data_seconds"] <= h["seconds"] for h in trainer.history)
        return summary["data_wait_share"]
    slow, fast = share(Slow(batches, 0.05), "slow"), share(Fixed(batches), "fast")
    assert slow > 0.8 and fast < 0.5, (slow, fast)  # a Linear step takes ~1 ms; the slow loader 100 ms a step
