"""The encoders on a GPU: bf16, torch.compile(fullgraph=True) with no graph breaks, eager vs compiled speed.

    python bench/encoders_gpu.py [--preset small] [--out bench/results/encoders_h200.json]

For each encoder (and a bare TransformerBlock from 03_layers) at a preset's size, on realistic padded batches:
graph breaks counted by torch._dynamo.explain, outputs of the compiled module against eager under bf16 autocast,
and forward+backward time of both (median of 10 after warm-up), measured in one run so ratios are comparable.
The vision encoder also runs at the article's 640x640 with the base preset's 16-px patches and 7-patch windows.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from r1_scratch.audio import AudioEncoder
from r1_scratch.config import get_preset
from r1_scratch.layers import TransformerBlock, init_weights
from r1_scratch.text import TextEncoder
from r1_scratch.vision import VisionEncoder

REPO = Path(__file__).resolve().parents[1]


def text_case(m, batch):
    lengths = torch.randint(m.max_seq_len // 4, m.max_seq_len + 1, (batch,))
    lengths[0] = m.max_seq_len
    mask = torch.arange(m.max_seq_len)[None] < lengths[:, None]
    ids = torch.randint(0, m.vocab_size, (batch, m.max_seq_len)) * mask
    return TextEncoder(m), (ids.cuda(), mask.cuda())


def vision_case(m, batch, size=None):
    size = size or m.image_size
    has = torch.ones(batch, dtype=torch.bool)
    has[-1] = False
    return VisionEncoder(m), (torch.rand(batch, 3, size, size).cuda(), has.cuda())


def audio_case(m, batch, seconds=6.0):
    n = int(seconds * m.sample_rate)
    lengths = torch.randint(n // 4, n + 1, (batch,))
    lengths[0] = n
    audio = torch.randn(batch, n) * 0.1 * (torch.arange(n)[None] < lengths[:, None])
    return AudioEncoder(m), (audio.cuda(), lengths.cuda())


def block_case(m, batch):
    x = torch.randn(batch, m.max_seq_len, m.d_model)
    pad = torch.ones(batch, m.max_seq_len, dtype=torch.bool)
    pad[0, m.max_seq_len // 2:] = False
    block = init_weights(TransformerBlock(m.d_model, m.n_heads, m.expert_hidden), m.n_layers)
    return block, (x.cuda().requires_grad_(), pad.cuda())


def output_of(y):
    return y.tokens if hasattr(y, "tokens") else y


def fwd_bwd(module, args):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = output_of(module(*args))
    y.float().square().mean().backward()
    return y


def median_time(module, args, n=10):
    for _ in range(3):
        fwd_bwd(module, args)
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(module, args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def measure(name, module, args):
    module = module.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(module)(*args)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_out, compiled_out = output_of(module(*args)).float(), output_of(compiled(*args)).float()
    rel_err = ((eager_out - compiled_out).norm() / eager_out.norm().clamp(min=1e-12)).item()
    eager_s, compiled_s = median_time(module, args), median_time(compiled, args)
    row = dict(module=name, params_M=round(sum(p.numel() for p in module.parameters()) / 1e6, 2),
               input_shapes=[list(a.shape) for a in args], graph_breaks=explained.graph_break_count,
               compiled_vs_eager_rel_err=rel_err, eager_ms=round(eager_s * 1e3, 3),
               compiled_ms=round(compiled_s * 1e3, 3), speedup=round(eager_s / compiled_s, 2),
               finite=bool(torch.isfinite(compiled_out).all()))
    print(json.dumps(row))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "bench/results/encoders_h200.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    m = get_preset(args.preset).model
    base = get_preset("base").model
    article = dataclasses.replace(base, image_size=640)  # the article's resolution, base's patches and windows
    cases = [("transformer_block", *block_case(m, args.batch)), ("text", *text_case(m, args.batch)),
             ("vision", *vision_case(m, args.batch)), ("audio", *audio_case(m, args.batch)),
             ("vision_640px_base", *vision_case(article, 4))]
    rows = []
    for name, module, inputs in cases:
        try:
            rows.append(measure(name, module, inputs))
        except Exception as error:  # one failing module must not hide the others' numbers
            rows.append(dict(module=name, error=f"{type(error).__name__}: {str(error)[:400]}"))
            print(json.dumps(rows[-1]))
    result = dict(benchmark="encoders_gpu", preset=args.preset, batch=args.batch, device=torch.cuda.get_device_name(),
                  torch=torch.__version__, autocast="bf16", rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
