"""The memory planner against real stage-3 batches, on the CPU with `tiny`: does it over-plan them, and by how much?

The planner (`19_scaling`) plans micro-batches of worst-case samples, and matched measured peaks within 10% on such
batches. A slice of `r1_22b` on the bundled data peaked at 0.81 of its plan (`bench/results/scale_h200.json`).
Here: `tiny`'s stage-3 loader batches (its token budget), three fp32 AdamW steps each, live bytes measured as
`19_scaling` measures them, against the plan for the same budget and against the plan for the batch's own tokens.

    python research/2026-12-06-planner-real-batches/real_batches.py [--batches 6]
"""
import argparse
import itertools
import json
from pathlib import Path

import torch

from r1_scratch.config import get_preset
from r1_scratch.data import build_loader
from r1_scratch.memory import measure_peak, plan_memory, sample_shape, synthetic_batch
from r1_scratch.model import R1Model

TENSORS = ("input_ids", "attention_mask", "labels", "images", "has_image", "audio", "audio_lengths")


def peak_of(cfg, batch: dict) -> int:
    torch.manual_seed(0)
    return measure_peak(R1Model(cfg.model), {k: batch[k] for k in TENSORS}, steps=3)["peak"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--out", default="research/2026-12-06-planner-real-batches/real_batches_cpu.json")
    args = p.parse_args()
    cfg = get_preset("tiny")
    cfg.data.num_workers = 0
    st = cfg.stages["sft"]
    worst = sample_shape(cfg).decoder
    # the plan of worst-case samples alone (the planner before it planned every kind of batch), and today's plan
    plan = plan_memory(cfg, "ddp", 1, None, "none", precision="fp32", slack=0, reserved_bytes=0, shape=sample_shape(cfg))
    every_kind = plan_memory(cfg, "ddp", 1, None, "none", precision="fp32", slack=0, reserved_bytes=0)
    worst_samples = plan.settings["micro_batch_tokens"] // worst
    rows = [dict(batch="worst case", samples=worst_samples, images=worst_samples, clips=worst_samples,
                 padded_length=worst, measured_mib=peak_of(cfg, synthetic_batch(cfg, worst_samples)) / 2**20)]
    loader = build_loader(cfg, "train", st.mixture, batch_size=st.batch_size, max_tokens=st.max_tokens)
    for i, batch in enumerate(itertools.islice(loader, args.batches)):
        n_img, n_clip = int(batch["has_image"].sum()), int((batch["audio_lengths"] > 0).sum())
        rows.append(dict(batch=i, samples=len(batch["input_ids"]), images=n_img, clips=n_clip,
                         padded_length=int(batch["input_ids"].shape[1]), measured_mib=peak_of(cfg, batch) / 2**20))
    state = (plan.parts["params"] + plan.parts["optimizer"]) / 2**20  # weights and AdamW's moments: exact
    for r in rows:
        r["planned_mib"] = round(plan.allocated / 2**20, 2)
        r["planned_over_measured"] = round(plan.allocated / 2**20 / r["measured_mib"], 3)
        r["beyond_state_ratio"] = round((plan.allocated / 2**20 - state) / (r["measured_mib"] - state), 3)
        r["every_kind_planned_mib"] = round(every_kind.allocated / 2**20, 2)
        r["every_kind_beyond_state_ratio"] = round((every_kind.allocated / 2**20 - state) / (r["measured_mib"] - state), 3)
        r["measured_mib"] = round(r["measured_mib"], 2)
        print(json.dumps(r), flush=True)
    result = dict(command="python research/2026-12-06-planner-real-batches/real_batches.py", preset="tiny",
                  token_budget=st.max_tokens, worst_case_sample_tokens=worst, state_mib=round(state, 2), plan_phase=plan.phase, every_kind_batch=every_kind.settings['batch'], rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
