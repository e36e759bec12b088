"""Execute the course's notebooks in place and clean them, so that the outputs GitHub shows match the code.

    python tools/run_notebooks.py                      # every notebook in nbs/, in order
    python tools/run_notebooks.py nbs/03_layers.ipynb nbs/05_vision_encoder.ipynb
    python tools/run_notebooks.py --check              # only look for machine paths in the committed outputs

Each notebook runs top to bottom from `nbs/` as `nbdev_test` runs it: cells flagged with one of settings.ini's
`tst_flags` (`#| slow`, `#| cuda`, `#| notest`) are skipped and keep the outputs they have (from the machine that
last ran them), with a fixed hash seed, offline W&B, no progress bars and matplotlib's inline backend (a caller's
`MPLBACKEND=Agg` would leave the figures out of the outputs).
Then the outputs are scrubbed of this machine's paths (the checkout, the Python environment, the home directory and
temporary directories become `.`, `<python>`, `~` and `<tmp>`), and `nbdev_clean` strips execution counts and
metadata. A notebook that fails stops the run with its error; the notebooks done before it keep their new outputs.
Outputs that still hold an absolute path after scrubbing are listed and make the exit status 1.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:home|root|tmp|work|usr|opt|var|mnt|Users)/[^\s'\"),\]]+")


def replacements() -> list[tuple[str, str]]:
    "Machine paths, longest first, and what stands in for each in an output."
    pairs = [(str(ROOT) + "/", ""), (str(ROOT), "."), (sys.prefix, "<python>"), (sys.base_prefix, "<python>"),
             (tempfile.gettempdir(), "<tmp>"), (str(Path.home()), "~")]
    return sorted({(a, b) for a, b in pairs if len(a) > 1}, key=lambda p: -len(p[0]))


def scrub_text(text: str, pairs: list[tuple[str, str]]) -> str:
    for path, stand_in in pairs: text = text.replace(path, stand_in)
    return text


def scrub(nb, pairs) -> None:
    "Replace machine paths in every text output of `nb` (stream text, plain/html/markdown data, tracebacks)."
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out: out["text"] = scrub_text(out["text"], pairs)
            if "traceback" in out: out["traceback"] = [scrub_text(t, pairs) for t in out["traceback"]]
            for key, value in out.get("data", {}).items():
                if key.startswith("text/") or key == "application/json":
                    out["data"][key] = scrub_text(value, pairs) if isinstance(value, str) else value


def machine_paths(nb) -> list[str]:
    "Absolute paths left in the outputs of `nb`."
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + out.get("traceback", [])
            texts += [v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)]
            for text in texts: found += ABSOLUTE.findall(text if isinstance(text, str) else "".join(text))
    return found


def skip_flags() -> set[str]:
    "settings.ini's tst_flags: the cells nbdev_test skips."
    for line in (ROOT / "settings.ini").read_text().splitlines():
        if line.replace(" ", "").startswith("tst_flags="): return set(line.split("=", 1)[1].split())
    return {"notest"}


def skipped(cell, flags: set[str]) -> bool:
    directives = [l[2:].split() for l in cell.source.splitlines() if l.startswith("#|")]
    return any(d and d[0] in flags for d in directives)


def execute(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    flags = skip_flags()
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and not skipped(cell, flags): client.execute_cell(cell, index)
    seconds = time.perf_counter() - start
    scrub(nb, replacements())
    nbformat.write(nb, path)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: every nbs/[0-9]*.ipynb)")
    p.add_argument("--timeout", type=int, default=900, help="seconds a cell may take")
    p.add_argument("--check", action="store_true", help="do not execute: report machine paths in the outputs")
    args = p.parse_args()
    paths = [Path(n).resolve() for n in args.notebooks] or sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
    missing = [str(n) for n in paths if not n.exists()]
    if missing: raise SystemExit(f"no such notebook: {', '.join(missing)}")
    os.environ.update(MPLBACKEND="module://matplotlib_inline.backend_inline", WANDB_MODE="offline",
                      PYTHONHASHSEED="0", R1_NO_PROGRESS="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not args.check:
        for path in paths:
            print(f"{path.relative_to(ROOT)} ... ", end="", flush=True)
            print(f"{execute(path, args.timeout):.0f} s", flush=True)
        subprocess.run(["nbdev_clean"], cwd=ROOT, check=True)
    status = 0
    for path in paths:
        left = machine_paths(nbformat.read(path, as_version=4))
        if left:
            status = 1
            print(f"{path.relative_to(ROOT)}: machine paths in outputs: {sorted(set(left))[:5]}")
    return status


if __name__ == "__main__":
    sys.exit(main())
