"""The MoE layer of 08_moe on one GPU: every dispatch path against the iso-FLOP dense FFN, bf16, forward + backward.

Width 1024, 16 experts of hidden 2816, top-2; the dense FFN is a SwiGLU of hidden 2 x 2816 (the same FLOPs per
token). Rows: the article's per-token loop (timed on a few tokens, extrapolated), the reference loop, per-expert
gather, the grouped GEMMs alone on pre-sorted, evenly split rows (the floor), the first grouped path (argsort, index gather, index_add_ scatter), the grouped path of 08_moe
(counting sort, gather-only permutations), both compiled, the article's five heterogeneous families, and the full
MoELayer (routing, aux losses, statistics). Every time is compared with the dense FFN measured in the same run.

    python bench/moe_dispatch.py [--tokens 2048 8192 16384 32768] [--out bench/results/moe_dispatch_h200.json]
"""
import argparse
import json
import time
from pathlib import Path

import torch

from r1_scratch.layers import MLP
from r1_scratch.moe import (ExpertFamilies, Experts, MoELayer, Router, article_families, dispatch_gather,
                            dispatch_grouped, dispatch_reference, expert_counts)

D, H, E, K = 1024, 2816, 16, 2


def fwd_bwd(fn, x):
    x = x.detach().requires_grad_()
    y = fn(x)
    y.float().square().mean().backward()
    return y.detach(), x.grad


def timed(fn, x, n=10, warmup=3):
    for _ in range(warmup):
        fwd_bwd(fn, x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fwd_bwd(fn, x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def grouped_v1(x, routing, experts):
    "The first grouped path, kept as the ablation: argsort, x[token] gather, index_add_ scatter (atomics)."
    flat = routing.experts.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // routing.experts.shape[1]
    counts = expert_counts(flat, experts.n_experts)
    offsets = counts.cumsum(0)
    y = experts.grouped(x[token], counts, offsets) * routing.gates.reshape(-1)[order].to(x.dtype)[:, None]
    return torch.zeros_like(x).index_add_(0, token, y)


def article_loop(x, router, experts):
    "The article's layer repaired per token: one expert call per token and choice."
    r = router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(r.experts.shape[1]):
            out[t] += r.gates[t, j].to(x.dtype) * experts.one(x[t:t + 1], int(r.experts[t, j]))[0]
    return out


def gemm_only(experts, T):
    "The floor: only the two grouped GEMMs (and the activation) on rows already sorted, with perfectly even counts."
    counts = torch.full((E,), T * K // E, device="cuda")
    offsets = counts.cumsum(0)
    return lambda rows: experts.grouped(rows, counts, offsets)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def build():
    torch.manual_seed(0)
    router = Router(D, E, K).cuda()
    experts = Experts(E, D, H).cuda().bfloat16()
    families = ExpertFamilies(article_families(H), D).cuda().bfloat16()
    layer = MoELayer(D, H, E, K).cuda()
    layer.experts.bfloat16()
    dense = MLP(D, 2 * H, "swiglu").cuda().bfloat16()
    return router, experts, families, layer, dense


def paths(router, experts, families, layer, dense):
    moe = lambda dispatch, ex: (lambda t: dispatch(t, router(t), ex))
    eager = {"dense": dense, "reference": moe(dispatch_reference, experts), "gather": moe(dispatch_gather, experts),
             "grouped_v1": moe(grouped_v1, experts), "grouped": moe(dispatch_grouped, experts),
             "families": moe(dispatch_grouped, families), "layer": lambda t: layer(t[None])[0][0]}
    compiled = {f"{name}_compiled": torch.compile(eager[name]) for name in ("dense", "grouped_v1", "grouped", "families", "layer")}
    return eager | compiled


def equality(fns, T=4096):
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ref_y, ref_g = fwd_bwd(fns["reference"], x)
    out = {}
    for name in ("gather", "grouped_v1", "grouped", "grouped_compiled"):
        y, g = fwd_bwd(fns[name], x)
        out[name] = dict(output=rel_err(y, ref_y), input_grad=rel_err(g, ref_g))
    return out


def families_equality(router, families, T=4096):
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ref_y, ref_g = fwd_bwd(lambda t: dispatch_reference(t, router(t), families), x)
    y, g = fwd_bwd(lambda t: dispatch_grouped(t, router(t), families), x)
    return dict(output=rel_err(y, ref_y), input_grad=rel_err(g, ref_g))


def article_row(router, experts, T, probe=128):
    x = torch.randn(probe, D, device="cuda", dtype=torch.bfloat16)
    per_token = timed(lambda t: article_loop(t, router, experts), x, n=1, warmup=1) / probe
    return per_token * T


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    p.add_argument("--out", default="bench/results/moe_dispatch_h200.json")
    args = p.parse_args()
    router, experts, families, layer, dense = build()
    fns = paths(router, experts, families, layer, dense)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, width=D, hidden=H, experts=E, top_k=K,
                  dtype="bf16", measure="forward + backward, mean of 10 after 3 warm-up calls",
                  equality_vs_reference=equality(fns), families_vs_reference=families_equality(router, families), rows=[])
    for T in args.tokens:
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        times = {name: timed(fn, x) for name, fn in fns.items()}
        rows = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
        times["grouped_gemm_only"] = timed(gemm_only(experts, T), rows)
        times["grouped_gemm_only_compiled"] = timed(torch.compile(gemm_only(experts, T)), rows)
        times["article_loop_extrapolated"] = article_row(router, experts, T)
        for name, t in times.items():
            if name.startswith("dense"): continue
            base = times["dense_compiled"] if name.endswith("_compiled") else times["dense"]
            result["rows"].append(dict(path=name, tokens=T, ms=round(t * 1e3, 3), dense_ms=round(base * 1e3, 3),
                                       dense_over_moe=round(base / t, 4)))
        print(json.dumps([r for r in result["rows"] if r["tokens"] == T]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
