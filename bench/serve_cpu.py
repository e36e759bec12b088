"""Requests/s and latency of the TorchServe server (18_serving) under concurrent clients, on the CPU.

    python bench/serve_cpu.py [--requests 200] [--clients 8] [--checkpoint RUN_OR_CHECKPOINT]
                              [--out bench/results/serve_cpu.json]

Builds the model archive, starts `torchserve` on free 127.0.0.1 ports and sends `--requests` validation questions
(visual QA with its PNG, audio QA with its WAV, and text-only questions, in turn; 16 new tokens each) from
`--clients` threads at once, then one client alone for comparison. Without `--checkpoint` the model is a fresh
`tiny` one with untied embeddings (its greedy answers are never cut short by an early stop token, so every request
costs its full 16 tokens). Both processes run one torch thread (OMP_NUM_THREADS, unless set). Every reply must
be a 200 whose answer is the Predictor's for the same request.
"""
import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# One intra-op thread in this process and in the server's worker (it inherits the environment): on 2 shared cores
# two threads each would fight each other, the Java frontend and the clients
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import requests
import torch
import webdataset as wds

from r1_scratch.config import apply_overrides, config_to_dict, get_preset, with_data_root
from r1_scratch.data import expand_shards
from r1_scratch.model import R1Model
from r1_scratch.runtime import Runtime
from r1_scratch.serve import Predictor, TorchServe, build_archive
from r1_scratch.trainer import Checkpoints

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or None


def fresh_checkpoint(folder: Path) -> Path:
    "A fresh tiny model, untied, saved as the trainer saves it."
    cfg = with_data_root(apply_overrides(get_preset("tiny"), ["model.tie_embeddings=false"]), ROOT)
    torch.manual_seed(0)
    meta = dict(step=0, stage="init", config=config_to_dict(cfg))
    Checkpoints(folder / "checkpoints").save(0, R1Model(cfg.model), {}, meta, Runtime(torch.device("cpu")))
    return folder


def val_requests(task: str, n: int) -> list[dict]:
    "The first `n` validation questions of `task`, as a client would send them (raw PNG/WAV bytes in base64)."
    pattern = str(ROOT / "data_samples/val" / f"{task}-{{000000..000001}}.tar")
    out = []
    for record in wds.WebDataset(expand_shards(pattern), shardshuffle=False):
        meta = json.loads(record["json"])
        if not meta.get("instruction"): continue
        request = {"text": meta["instruction"]}
        request |= {"image": base64.b64encode(record[k]).decode() for k in ("png", "jpg") if k in record}
        request |= {"audio": base64.b64encode(record[k]).decode() for k in ("wav", "flac") if k in record}
        out.append(request)
        if len(out) == n: break
    return out


def mixed_requests(n: int) -> list[dict]:
    "`n` requests: visual QA, audio QA and text-only (the visual questions without their images), in turn."
    vqa, audio = val_requests("vqa", n), val_requests("audio_qa", n)
    text = [{"text": r["text"]} for r in vqa]
    kinds = [vqa, audio, text]
    return [kinds[i % 3][i // 3 % len(kinds[i % 3])] for i in range(n)]


def load(url: str, requests_: list[dict], clients: int) -> tuple[list[float], list[dict | None], float]:
    "Send `requests_` from `clients` threads: each latency (s), each reply (None for a non-200), the wall time."
    session = [requests.Session() for _ in range(clients)]

    def one(i):
        t0 = time.perf_counter()
        reply = session[i % clients].post(url, json=requests_[i], timeout=300)
        return time.perf_counter() - t0, reply.json() if reply.status_code == 200 else None

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool: results = list(pool.map(one, range(len(requests_))))
    wall = time.perf_counter() - start
    return [r[0] for r in results], [r[1] for r in results], wall


def summary(latencies: list[float], replies: list, wall: float, expected: list[str]) -> dict:
    ms = np.array(latencies) * 1e3
    wrong = sum(r is not None and r["answer"] != e for r, e in zip(replies, expected))
    batches = Counter(r["batch_size"] for r in replies if r is not None)
    return dict(requests=len(replies), errors=sum(r is None for r in replies), wrong_answers=wrong,
                requests_per_s=round(len(replies) / wall, 2), latency_p50_ms=round(float(np.percentile(ms, 50)), 1),
                latency_p99_ms=round(float(np.percentile(ms, 99)), 1), latency_max_ms=round(float(ms.max()), 1),
                server_batch_sizes=dict(sorted(batches.items())), wall_s=round(wall, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--checkpoint", help="run, stage or checkpoint directory (default: a fresh tiny model)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/serve_cpu.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else fresh_checkpoint(work / "run")
    predictor = Predictor.load(checkpoint)
    batch = mixed_requests(args.requests)
    expected = [predictor.predict([r])[0]["answer"] for r in batch]  # one at a time: no batching in the reference
    build_archive(checkpoint, work / "store")
    server = TorchServe(work / "store", work / "server")
    t0 = time.perf_counter()
    server.start()
    startup = time.perf_counter() - t0
    try:
        load(server.url, batch[: 2 * args.clients], args.clients)  # warm-up: first calls allocate
        concurrent = summary(*load(server.url, batch, args.clients), expected)
        n_alone = max(args.requests // 5, 1)
        alone = summary(*load(server.url, batch[:n_alone], 1), expected[:n_alone])
    finally: server.stop()
    command = "python bench/serve_cpu.py" + "".join(f" {a}" for a in sys.argv[1:] if not os.path.isabs(a))
    result = dict(command=command, commit=git_commit(), benchmark="serve_cpu",
                  checkpoint="fresh tiny (untied embeddings)" if not args.checkpoint else "given checkpoint",
                  new_tokens=16, request_mix="visual QA (PNG), audio QA (WAV), text-only, in turn",
                  server="torchserve 0.12.0, 1 worker, batchSize 8, maxBatchDelay 10 ms", startup_s=round(startup, 1),
                  cpus=os.cpu_count(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__,
                  python=platform.python_version(),
                  rows={f"{args.clients} clients": concurrent, "1 client": alone})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["rows"].items():
        print(f"{name}: {row['requests']} requests, {row['errors']} errors, {row['wrong_answers']} wrong answers, "
              f"{row['requests_per_s']} requests/s, p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, "
              f"server batches {row['server_batch_sizes']}")
    if concurrent["errors"] or concurrent["wrong_answers"]: sys.exit(1)


if __name__ == "__main__":
    main()
