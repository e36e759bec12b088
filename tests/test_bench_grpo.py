"""bench/grpo_gpu.py's own logic, without training: the goals on a before/after table, the curves read from a grpo
stage's metrics.jsonl, the held-out problems (fresh, counted, reused) and the JSON's paths."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("grpo_gpu", REPO / "bench" / "grpo_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scores_read_the_evaluation_json(bench):
    val = dict(answers=dict(vqa=dict(accuracy=0.9), reasoning=dict(accuracy=0.5)),
               retrieval={"image_t2x_R@1": 0.99, "image_x2t_R@1": 0.98})
    held = dict(answers=dict(reasoning=dict(accuracy=0.7, by_kind=dict(grid=dict(accuracy=0.4, samples=5)))))
    s = bench.scores(val, held)
    assert s["held_out_reasoning"] == 0.7 and s["held_out_reasoning/grid"] == 0.4
    assert s["val_vqa"] == 0.9 and s["val_reasoning"] == 0.5 and s["image_x2t_R@1"] == 0.98
    assert s["val_audio_qa"] is None and s["audio_t2x_R@1"] is None  # not evaluated here: missing, not zero


def test_goals_on_a_before_after_table(bench):
    before = {"held_out_reasoning": 0.6, "val_vqa": 0.95, "val_audio_qa": None, "image_t2x_R@1": 0.99,
              "image_x2t_R@1": 0.99}
    after = {"held_out_reasoning": 0.86, "val_vqa": 0.93, "val_audio_qa": None, "image_t2x_R@1": 0.96,
             "image_x2t_R@1": 0.99}
    table = bench.compare(before, after)
    assert table["held_out_reasoning"] == dict(before=0.6, after=0.86, delta=0.26)
    assert table["image_t2x_R@1"]["delta"] == -0.03 and table["val_audio_qa"]["delta"] is None
    g = bench.goals(table)
    assert g["held_out_reasoning"]["met"] is True
    assert g["val_vqa"]["met"] is True            # fell by exactly 0.02: allowed
    assert g["image_t2x_R@1"]["met"] is False     # fell by 0.03
    assert g["image_x2t_R@1"]["met"] is True
    assert g["val_audio_qa"]["met"] is None       # not measured: neither met nor failed
    after["held_out_reasoning"] = 0.84
    assert bench.goals(bench.compare(before, after))["held_out_reasoning"]["met"] is False


def test_curves_from_metrics_jsonl(bench, tmp_path):
    rows = [dict(step=s, loss=0.1 * s, lr=1e-5, reward=0.2 * s, accuracy=0.1 * s, format=1.0, answer_length=40 - s,
                 kl=0.001 * s, clip_fraction=0.01, kept_groups=1.0) for s in (1, 2, 3)]
    rows.insert(2, dict(step=2, val_accuracy=0.5))  # an evaluation row: not a training point
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    curves = bench.read_curves(path)
    assert curves["step"] == [1, 2, 3]
    assert curves["reward"] == [0.2, 0.4, 0.6] and curves["answer_length"] == [39, 38, 37]
    assert curves["kl"] == [0.001, 0.002, 0.003] and curves["clip_fraction"] == [0.01] * 3
    assert set(curves) == {"step", *bench.CURVE_KEYS}
    png = bench.plot_curves(curves, tmp_path / "curves.png", "test")
    assert png.stat().st_size > 1000
    assert bench.plot_curves({}, tmp_path / "x.png", "") is None


def test_held_out_problems_are_fresh_unseen_counted_and_reused(bench, tmp_path):
    bundled = set(bench.shard_questions(str(REPO / "data_samples/train/{task}-{000000..000003}.tar")))
    assert len(bundled) > 200
    pattern, info = bench.write_problems(tmp_path / "held", 45, bundled)
    held = bench.shard_questions(pattern)
    assert len(held) == 45 and len(set(held)) == 45  # no repeats
    assert not set(held) & bundled                 # none of the train split's problems
    assert sum(info["kinds"].values()) == 45 and set(info["kinds"]) == {"count", "story", "corners", "grid"}
    assert info["seeds"][0] == bench.HELD_OUT_SEED and info["seeds"][1] >= bench.HELD_OUT_SEED + 1  # 40 a draw
    plain_pattern, plain = bench.write_problems(tmp_path / "plain", 45)
    assert sum(plain["dropped_seen_or_repeated"].values()) <= sum(info["dropped_seen_or_repeated"].values())
    marker = tmp_path / "held" / "problems.json"
    stamp = marker.stat().st_mtime_ns
    assert bench.write_problems(tmp_path / "held", 45, bundled) == (pattern, info)
    assert marker.stat().st_mtime_ns == stamp  # reused, not regrown
    bench.write_problems(tmp_path / "held", 45, set(held[:3]))  # another train split: regrown without those three
    assert not set(bench.shard_questions(pattern)) & set(held[:3])
    with pytest.raises(ValueError, match="--problems"):
        bench.write_problems(tmp_path / "none", 0)


def test_scrub_removes_the_repository_path(bench):
    value = dict(checkpoint=f"{bench.ROOT}/runs/x-grpo/grpo/checkpoints/step_000003", n=[1, f"{bench.ROOT}/a"], k=2)
    assert bench.scrub(value) == dict(checkpoint="runs/x-grpo/grpo/checkpoints/step_000003", n=[1, "a"], k=2)
