"""Quick GPU check of 08_moe's grouped path: torch._grouped_mm (bf16) against the reference, forward and backward,
and a first timing against the iso-FLOP dense FFN. The full benchmark (all rows of issue 4) is bench/moe_dispatch.py, to come.

    python bench/moe_gpu_check.py [--out bench/results/moe_gpu_check_h200.json]
"""
import argparse
import json
import time
from pathlib import Path

import torch

from r1_scratch.layers import MLP
from r1_scratch.moe import DISPATCH, Experts, Router


def fwd_bwd(fn, x):
    x = x.detach().requires_grad_()
    y = fn(x)
    y.float().square().mean().backward()
    return y.detach(), x.grad


def timed(fn, x, n=10):
    for _ in range(3):
        fwd_bwd(fn, x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fwd_bwd(fn, x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/moe_gpu_check_h200.json")
    args = p.parse_args()
    torch.manual_seed(0)
    D, H, E, K = 1024, 2816, 16, 2
    router = Router(D, E, K).cuda()
    experts = Experts(E, D, H).cuda().bfloat16()
    rows = {}
    x = torch.randn(4096, D, device="cuda", dtype=torch.bfloat16)
    ref_y, ref_g = fwd_bwd(lambda t: DISPATCH["reference"](t, router(t), experts), x)
    for path in ("gather", "grouped"):
        y, g = fwd_bwd(lambda t: DISPATCH[path](t, router(t), experts), x)
        rows[f"{path}_vs_reference_rel_err"] = dict(
            output=((y.float() - ref_y.float()).norm() / ref_y.float().norm()).item(),
            input_grad=((g.float() - ref_g.float()).norm() / ref_g.float().norm()).item())
    dense = MLP(D, 2 * H, "swiglu").cuda().bfloat16()  # iso-FLOP: top-2 of hidden H = one FFN of hidden 2H
    timings = []
    for T in (8192, 16384):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        t_dense = timed(dense, x)
        t_grouped = timed(lambda t: DISPATCH["grouped"](t, router(t), experts), x)
        t_gather = timed(lambda t: DISPATCH["gather"](t, router(t), experts), x)
        timings.append(dict(tokens=T, dense_ms=round(t_dense * 1e3, 3), grouped_ms=round(t_grouped * 1e3, 3),
                            gather_ms=round(t_gather * 1e3, 3), dense_over_grouped=round(t_dense / t_grouped, 3),
                            dense_over_gather=round(t_dense / t_gather, 3)))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, width=D, hidden=H, experts=E,
                  top_k=K, dtype="bf16", equality=rows, timings=timings)
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
