"""MHA and MLA decoding on the CPU (`small`, random weights, bf16): does the CPU show the GPU's gap?

    python research/2026-12-06-sdpa-shapes/cpu_decode.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from mla_gpu import generation_speed  # noqa: E402

rows = {att: generation_speed("small", att, [256], 2, 16, device="cpu")[0] for att in ("mha", "mla")}
out = Path(__file__).with_name("cpu_decode_cpu.json")
out.write_text(json.dumps(dict(command="python research/2026-12-06-sdpa-shapes/cpu_decode.py", rows=rows), indent=1) + "\n")
for att, row in rows.items(): print(att, row["decode_tokens_per_s"], "tokens/s")
