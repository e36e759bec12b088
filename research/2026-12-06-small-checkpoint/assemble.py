"""Turns the outputs of one H100 machine (copied from the device's runs/gpu_out/) into bench/results files.

    python research/2026-12-06-small-checkpoint/assemble.py GPU_OUT

The launches of `small` with MHA and with MLA ran by hand (the commands below), not through bench/mla_gpu.py, to fit
the GPU time at hand; their side-by-side table is computed here with mla_gpu.py's own `side_by_side`.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from mla_gpu import side_by_side  # noqa: E402

RESULTS = ROOT / "bench/results"
HERE = Path(__file__).resolve().parent
DEVICE = "NVIDIA H100 80GB HBM3"
LAUNCH = ("python -m torch.distributed.run --standalone --nproc_per_node=1 r1_scratch/launch.py --preset small "
          "--name {name} --fresh train.out_dir=runs train.wandb=disabled "
          "data.train=runs/data16/train/{{task}}-{{000000..000063}}.tar data.val=runs/data16/val/{{task}}-{{000000..000001}}.tar "
          "data.tokenizer=runs/data16/tokenizer.json train.eval_every=0 train.ckpt_every=0 "
          "stages.align.steps=750 stages.sft.steps=320{extra}")
GROW = "python bench/stages_gpu.py --grow-only --scale 16 --data runs/data16"


def load(path: Path) -> dict: return json.loads(path.read_text())


def write(name: str, data: dict) -> None:
    (RESULTS / name).write_text(json.dumps(data, indent=1) + "\n")
    print("wrote", RESULTS / name)


def fix_out(command: str, old: str, new: str) -> str:
    "The --out the device wrote to (runs/gpu_out/...) replaced by where the file lives in the repository."
    return command.replace(old, new)


def judged_with_counts(compress: dict, grpo: dict) -> dict:
    """The goals judged by bench/compress.py's later `goals`, which weighs each accuracy by the questions it rests on.
    This run's rows predate the count (`{task}_samples`); the val split is the one GRPO's evaluation of the same
    checkpoint scored, so its counts are read from there."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("compress_bench", ROOT / "bench/compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    answers = grpo["after"]["val"]["answers"]
    counts = {f"{task}_samples": r["samples"] for task, r in answers.items()}
    rows = [dict(row, **counts) for row in compress["rows"]]
    return dict(question_counts=counts, goals=bench.goals(rows))


def summaries(folder: Path, prefix: str) -> dict:
    return {s: load(folder / f"{prefix}summary_{s}.json") for s in ("pretrain", "align", "sft")}


def main(gpu_out: Path) -> None:
    results = gpu_out / "results"
    compress = load(results / "compress_small_h100.json")
    compress["command"] = fix_out(compress["command"], "runs/gpu_out/results/", "bench/results/")
    compress["checkpoint_from"] = LAUNCH.format(name="stages-small", extra="") + f"  (after: {GROW})"
    compress["goals_with_question_counts"] = judged_with_counts(compress, load(gpu_out / "grpo120.json"))
    write("compress_small_h100.json", compress)

    for src, name, folder in ((gpu_out / "grpo120.json", "grpo_small_h100.json", RESULTS),
                              (results / "grpo_small_h100.json", "grpo_40_steps_h100.json", HERE)):
        grpo = load(src)
        grpo["command"] = fix_out(fix_out(grpo["command"], "runs/gpu_out/results/grpo_small_h100.json", str((folder / name).relative_to(ROOT))),
                                  "runs/gpu_out/grpo120.json", str((folder / name).relative_to(ROOT)))
        grpo["curves_png"] = str((folder / name).with_suffix(".png").relative_to(ROOT))
        grpo["checkpoint_from"] = compress["checkpoint_from"]
        (folder / name).write_text(json.dumps(grpo, indent=1) + "\n")
        (folder / name).with_suffix(".png").write_bytes(Path(src).with_suffix(".png").read_bytes())
        print("wrote", folder / name)

    arms = {"mha": {"stages": summaries(gpu_out, "")}, "mla": {"stages": summaries(gpu_out, "mla_")}}
    table, verdict = side_by_side(arms)
    gen = load(results / "mla_gen_h100.json")
    write("mla_small_h100.json", dict(
        what="small with MHA and with MLA, stages 1-3 on one H100 on a shortened schedule (train data x16, stage 2 750 "
             "steps, stage 3 320 steps; the preset's are x64-grown data, 1,500 and 1,120), each stage's validation from its "
             "summary; decode speed at 1,024 cached tokens (bench/mla_gpu.py --generation-only).",
        commands=dict(grow=GROW, mha=LAUNCH.format(name="stages-small", extra=""),
                      mla=LAUNCH.format(name="stages-small-mla", extra=" model.attention=mla"),
                      generation=fix_out(gen["command"], "runs/gpu_out/results/mla_gen_h100.json", "bench/results/mla_small_h100.json")),
        commit=compress["commit"], device=DEVICE, arms=arms, side_by_side=table, within_2_points=verdict,
        generation=gen["generation"]))

    decode_cudnn = load(results / "mla_gen_cudnn_h100.json")
    base = {arm: load(gpu_out / f"svd_base_sft_{arm}.json") for arm in ("decoder", "cudnn")}
    train = load(results / "train_small_decoder_policy_h100.json")
    launch, cached = (next(r for r in train["rows"] if r["mode"].startswith(m)) for m in ("launch", "cached"))
    mha_decode = gen["generation"]["mha"][0]["decode_tokens_per_s"]
    write("attention_policy_h100.json", dict(
        what="The shipping attention policy (cuDNN left out of the decoder's attention only) against cuDNN kept "
             "everywhere (R1_CUDNN_ATTENTION=1), each pair in one call on one H100.",
        commit=compress["commit"], device=DEVICE,
        decode=dict(command=gen["command"].replace(" --out runs/gpu_out/results/mla_gen_h100.json", "") + "  (and again with R1_CUDNN_ATTENTION=1 --arms mha)",
                    mha_decoder_policy=gen["generation"]["mha"][0], mha_cudnn_kept=decode_cudnn["generation"]["mha"][0]),
        base_stage3_held_batches=dict(command=base["decoder"]["command"].replace(" --out runs/gpu_out/svd_base_sft_decoder.json", "") + "  (and again with R1_CUDNN_ATTENTION=1)",
                                      decoder_policy=base["decoder"]["rows"], cudnn_kept=base["cudnn"]["rows"]),
        small_stage3_launch_vs_cached=dict(command=fix_out(train["command"], "runs/gpu_out/results/train_small_decoder_policy_h100.json", "bench/results/attention_policy_h100.json"),
                                           rows=train["rows"]),
        ratios=dict(
            decode_tokens_per_s_policy_vs_kept=round(mha_decode / decode_cudnn["generation"]["mha"][0]["decode_tokens_per_s"], 2),
            base_stage3_mfu_policy_vs_kept=round(base["decoder"]["rows"][0]["mfu"] / base["cudnn"]["rows"][0]["mfu"], 3),
            base_stage3_mfu_vs_compiled_plain=base["decoder"]["rows"][0]["mfu_vs_best_plain"],
            small_launch_vs_cached=round(launch["tokens_per_s"] / cached["tokens_per_s"], 2))))

    svd = load(gpu_out / "svd_small_compile.json")
    svd["command"] = "TORCH_LOGS=recompiles " + fix_out(svd["command"], "runs/gpu_out/svd_small_compile.json", "bench/results/step_vs_dense_small_h100.json")
    svd["recompile_log_lines"] = sum("Recompiling function" in line for line in (gpu_out / "svd_small.log").read_text().splitlines())
    write("step_vs_dense_small_h100.json", svd)

    profile = load(gpu_out / "profile_small.json")
    profile["command"] = fix_out(profile["command"], "runs/gpu_out/profile_small.json", "bench/results/train_profile_h100.json")
    write("train_profile_h100.json", profile)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
