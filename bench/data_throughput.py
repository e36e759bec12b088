"""Records/s decoded by the data pipeline with 0, 1 and 2 DataLoader workers, in one run (ratios, not absolutes).

    python bench/data_throughput.py [--batches 60] [--out bench/results/data_throughput_cpu.json]

Reads stage 3's mixture (images, audio at 16 and 48 kHz, long text) from data_samples/ with the tiny preset's
token budget: decode + resample + tokenize + budget batching + collate, everything a training step waits for.
Each setting is run twice, interleaved, and the better run is kept: this machine is shared and noisy.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from r1_scratch.config import get_preset, with_data_root
from r1_scratch.data import build_loader

REPO = Path(__file__).resolve().parents[1]


def config():
    return with_data_root(get_preset("tiny"), REPO)


def records_per_second(cfg, workers, batches):
    "Samples/s over `batches` batches, after 3 warm-up batches (worker start-up is reported separately)."
    sft = cfg.stages["sft"]
    t_start = time.perf_counter()
    loader = iter(build_loader(cfg, "train", sft.mixture, max_tokens=sft.max_tokens, batch_size=64,
                               num_workers=workers))
    for _ in range(3):
        next(loader)
    startup = time.perf_counter() - t_start
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(loader)["key"])
    return n / (time.perf_counter() - t0), startup


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "bench/results/data_throughput_cpu.json"))
    args = parser.parse_args()
    cfg, rows = config(), {}
    for repeat in range(2):
        for workers in (0, 1, 2):
            rate, startup = records_per_second(cfg, workers, args.batches)
            best = rows.get(workers)
            if best is None or rate > best["records_per_s"]:
                rows[workers] = dict(workers=workers, records_per_s=round(rate, 1), startup_s=round(startup, 2))
    base = rows[0]["records_per_s"]
    for row in rows.values():
        row["ratio_vs_0_workers"] = round(row["records_per_s"] / base, 2)
    result = dict(benchmark="data_throughput", mixture=cfg.stages["sft"].mixture,
                  max_tokens=cfg.stages["sft"].max_tokens, batches=args.batches, cpus=os.cpu_count(),
                  torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                  rows=list(rows.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for row in rows.values():
        print(f"{row['workers']} workers: {row['records_per_s']:8.1f} records/s  "
              f"(x{row['ratio_vs_0_workers']:.2f}, start-up {row['startup_s']} s)")


if __name__ == "__main__":
    main()
