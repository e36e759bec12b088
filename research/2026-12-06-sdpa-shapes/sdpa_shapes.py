"""Does SDPA's cuDNN backend pay for every new shape? Times bf16 attention on one GPU when each call has a shape not
seen before (decoding with a growing cache; training batches of new lengths) against calls of one repeated shape,
with PyTorch's default backend choice and with the cuDNN backend left out.

    python research/2026-12-06-sdpa-shapes/sdpa_shapes.py [--out research/2026-12-06-sdpa-shapes/sdpa_shapes_h200.json]
"""
import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None,
            "no cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}


def run(backend, fn, calls):
    "Mean milliseconds of fn(i) over calls i, under the backend set."
    ctx = sdpa_kernel(BACKENDS[backend]) if BACKENDS[backend] else contextlib.nullcontext()
    with ctx:
        fn(0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(1, calls + 1): fn(i)
        torch.cuda.synchronize()
    return round((time.perf_counter() - start) * 1e3 / calls, 3)


def decode(new_shape: bool, masked: bool, heads=6, dim=64, batch=8, context=1024):
    "One query token against a cache that grows by one each call (new_shape) or stays at `context`."
    k = torch.randn(batch, heads, context + 200, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    def fn(i):
        n = context + (i if new_shape else 0)
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool, device="cuda") if masked else None
        F.scaled_dot_product_attention(q, k[:, :, :n], k[:, :, :n], attn_mask=mask)
    return fn


def train(new_shape: bool, masked: bool, heads=12, dim=64, tokens=32768):
    "Forward and backward of a token-budget batch: rows x length = tokens, the length new each call or fixed."
    def fn(i):
        length = 512 + (8 * i if new_shape else 0)
        rows = max(1, tokens // length)
        q, k, v = (torch.randn(rows, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        mask = torch.ones(rows, 1, length, length, dtype=torch.bool, device="cuda").tril() if masked else None
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked).sum().backward()
    return fn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--out", default="research/2026-12-06-sdpa-shapes/sdpa_shapes_h200.json")
    args = p.parse_args()
    rows = []
    for case, make in (("decode", decode), ("train", train)):
        for masked in (False, True):
            for new_shape in (False, True):
                for backend in BACKENDS:
                    ms = run(backend, make(new_shape, masked), args.calls)
                    rows.append(dict(case=case, masked=masked, new_shape_each_call=new_shape, backend=backend, ms=ms))
                    print(json.dumps(rows[-1]), flush=True)
    result = dict(command="python research/2026-12-06-sdpa-shapes/sdpa_shapes.py", device=torch.cuda.get_device_name(),
                  torch=torch.__version__, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
