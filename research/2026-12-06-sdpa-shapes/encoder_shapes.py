"""How many distinct input shapes each attention stack meets in `small`'s stage 3, from the loader alone (no model run).

    python research/2026-12-06-sdpa-shapes/encoder_shapes.py [--micro-batches 160] [--out FILE]

cuDNN's SDPA plans every shape it has not seen (60-190 ms on an H100): each distinct shape is one such cost. The
loader groups samples by modality, and each micro-batch has its own number of rows (a token budget), so the vision
encoder's batch size and the audio encoder's (batch, frames) change with the batch, as the decoder's (batch, length)
do. 160 micro-batches are what a 40-step launch of `small`'s stage 3 reads (4 micro-batches a step).
"""
import argparse
import json
from pathlib import Path

from r1_scratch.config import get_preset, with_data_root
from r1_scratch.data import build_loader
from r1_scratch.model import R1Model

ROOT = Path(__file__).resolve().parents[2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batches", type=int, default=160)
    p.add_argument("--out", default=str(Path(__file__).with_name("encoder_shapes_cpu.json")))
    args = p.parse_args()
    cfg = with_data_root(get_preset("small"), ROOT)
    st = cfg.stages["sft"]
    loader = build_loader(cfg, "train", st.mixture, batch_size=st.batch_size, max_tokens=st.max_tokens, num_workers=0)
    audio_frames = R1Model(cfg.model).encoders.audio.frame_lengths
    seen = {"vision (batch)": set(), "audio (batch, frames)": set(), "decoder text (batch, length)": set()}
    first = {k: [] for k in seen}
    for i, batch in zip(range(args.micro_batches), loader):
        rows = batch["input_ids"].shape[0]
        shapes = {"decoder text (batch, length)": (rows, batch["input_ids"].shape[1])}
        if batch["has_image"].any(): shapes["vision (batch)"] = (rows,)
        if (batch["audio_lengths"] > 0).any():
            shapes["audio (batch, frames)"] = (rows, int(audio_frames(batch["audio_lengths"]).max()))
        for name, shape in shapes.items():
            if shape not in seen[name]:
                seen[name].add(shape)
                first[name].append(i)
    quarter = 3 * args.micro_batches // 4
    result = dict(command="python research/2026-12-06-sdpa-shapes/encoder_shapes.py "
                          f"--micro-batches {args.micro_batches}", micro_batches=args.micro_batches,
                  distinct_shapes={k: len(v) for k, v in seen.items()},
                  new_in_last_quarter={k: sum(j >= quarter for j in v) for k, v in first.items()})
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
