"""bench/stages_gpu.py's data reuse, as a GPU run meets it: data grown with speech (where espeak-ng's library
loaded) must serve later calls of the same run without it, instead of being deleted and regrown silent."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("stages_gpu", REPO / "bench" / "stages_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # a machine without the wheel: its import fails
    assert not module.speech_available()  # else these tests prove nothing
    return module


def test_growth_with_speech_is_reused_without_the_speech_library(bench, tmp_path):
    from r1_scratch.samples import SOURCES
    records = {s: 7 for s in SOURCES}
    (tmp_path / "grown.json").write_text(json.dumps(dict(scale=64, sources=sorted(SOURCES), records=records)))
    assert bench.grown_before(tmp_path, 64) == records
    assert bench.grown_before(tmp_path, 16) is None  # another scale is another growth


def test_growth_without_a_needed_source_is_not_reused(bench, tmp_path):
    silent = sorted(set(bench.SILENT) - {"vqa"})
    (tmp_path / "grown.json").write_text(json.dumps(dict(scale=64, sources=silent, records={})))
    assert bench.grown_before(tmp_path, 64) is None


def test_questions_with_speech_are_reused_without_the_speech_library(bench, tmp_path):
    out = tmp_path / "q"
    (out / "val").mkdir(parents=True)
    (out / "draws.json").write_text(json.dumps(dict(draws=10, sources=["vqa", "audio_qa"])))
    (out / "val" / "kept.tar").write_bytes(b"grown before")
    pattern = bench.grow_questions(out, 10)
    assert (out / "val" / "kept.tar").read_bytes() == b"grown before"  # not deleted and regrown
    assert pattern.endswith("/val/{task}-{000002..000021}.tar")
