"""Top CUDA kernels of one forward + backward of an MoE dispatch path (torch.profiler), to see where time goes.

    python bench/moe_profile.py [--tokens 16384] [--path grouped]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moe_dispatch import build, fwd_bwd, paths


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--path", nargs="+", default=["grouped", "grouped_v1"])
    args = p.parse_args()
    fns = paths(*build())
    x = torch.randn(args.tokens, 1024, device="cuda", dtype=torch.bfloat16)
    for name in args.path:
        for _ in range(3):
            fwd_bwd(fns[name], x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd_bwd(fns[name], x)
            torch.cuda.synchronize()
        print(f"== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
