"""The sample data as a user meets it: the committed folder, its layout and budget, determinism, the CLI,
speech from pip alone (no espeak-ng program anywhere), and a clear error when espeak-ng's library is missing."""
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from r1_scratch import samples
from r1_scratch.data import TASKS, TextTokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"


def read_records(root: Path, split: str, source: str) -> dict[str, dict[str, bytes]]:
    "key -> {ext: bytes} for every record of one source and split."
    records = defaultdict(dict)
    for shard in sorted((root / split).glob(f"{source}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                records[key][ext] = tar.extractfile(m).read()
    return dict(records)


@pytest.fixture(scope="module")
def committed():
    "Every committed record, by (split, source)."
    return {(split, source): read_records(SAMPLES, split, source) for split in samples.SHARDS for source in samples.SOURCES}


def folder_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the committed folder

def test_layout_counts_and_budget(committed):
    manifest = json.loads((SAMPLES / "manifest.json").read_text())
    for source in samples.SOURCES:
        assert sorted(p.name for p in (SAMPLES / "train").glob(f"{source}-*.tar")) == [f"{source}-{i:06d}.tar" for i in range(4)]
        assert sorted(p.name for p in (SAMPLES / "val").glob(f"{source}-*.tar")) == [f"{source}-{i:06d}.tar" for i in range(2)]
        for split in samples.SHARDS:
            entry = manifest["sources"][source][split]
            assert entry["records"] == len(committed[split, source]) > 0
            assert entry["bytes"] == sum((SAMPLES / s).stat().st_size for s in entry["shards"])
    train = sum(len(committed["train", s]) for s in samples.SOURCES)
    val = sum(len(committed["val", s]) for s in samples.SOURCES)
    assert (train, val) == (manifest["records"]["train"], manifest["records"]["val"])
    assert train >= 2000 and val >= 300
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) <= 25_000_000
    assert (manifest["seed"], manifest["limit"], manifest["version"]) == (0, 0, samples.VERSION)


def test_every_record_has_a_json_with_a_known_task(committed):
    expected = {"scenes": "caption", "digits": "caption", "speech": "caption", "text": "text", "instruct": "instruct",
                "reasoning": "reasoning", "vqa": "vqa", "audio_qa": "audio_qa", "problems": "problem"}
    for (split, source), records in committed.items():
        for key, members in records.items():
            assert re.fullmatch(rf"{source}-{split}-\d{{6}}", key), key
            meta = json.loads(members["json"])
            assert meta["task"] in TASKS and meta["task"] == expected[source], (key, meta)
            assert set(members) <= {"png", "flac", "txt", "json"}


def test_members_decode_and_match_their_json(committed):
    for key, m in committed["train", "scenes"].items():
        image, meta, caption = Image.open(io.BytesIO(m["png"])), json.loads(m["json"]), m["txt"].decode()
        assert image.size == (64, 64) and image.mode == "RGB"
        for o in meta["objects"]:  # the caption names every object's attributes
            assert f"{o['colour']} {o['shape']}" in caption and samples.PLACES[o["position"]] in caption.lower(), (key, caption)
    for key, m in committed["train", "digits"].items():
        image, meta = Image.open(io.BytesIO(m["png"])), json.loads(m["json"])
        assert image.size == (8, 8) and image.mode == "L" and 0 <= meta["label"] <= 9
    for key, m in committed["train", "speech"].items():
        meta = json.loads(m["json"])
        assert m["txt"].decode() == meta["transcript"] and sf.info(io.BytesIO(m["flac"])).duration > 0.5


def test_answers_are_closed_sets_and_checkable(committed):
    closed = set(samples.COLOURS) | set(samples.SHAPES) | set(samples.SIZES) | {"yes", "no"} | {str(d) for d in range(10)}
    for m in committed["train", "vqa"].values():
        meta = json.loads(m["json"])
        assert meta["answer"] == meta["response"] and meta["answer"] in closed and "png" in m
    for m in committed["train", "audio_qa"].values():
        meta = json.loads(m["json"])
        assert meta["answer"] in closed | {"fast", "slow"} and "flac" in m
        if meta["answer"] == "fast": assert meta["speed"] >= 185
        if meta["answer"] == "slow": assert meta["speed"] <= 135
    for m in committed["train", "reasoning"].values():
        meta = json.loads(m["json"])
        assert meta["response"].startswith("Step 1:") and meta["response"].endswith(f"Answer: {meta['answer']}")
    problems = [json.loads(m["json"]) | {"has_png": "png" in m} for m in committed["train", "problems"].values()]
    assert all(re.fullmatch(r"-?\d+", p["answer"]) and "response" not in p for p in problems)
    assert 0.4 < sum(p["has_png"] for p in problems) / len(problems) < 0.6


QUESTION_KINDS = {"vqa": (*samples.SCENE_QUESTION_KINDS, "digit"), "audio_qa": samples.AUDIO_QUESTION_KINDS,
                  "reasoning": samples.REASONING_KINDS}

@pytest.mark.parametrize("split", ["train", "val"])
def test_every_question_names_its_kind_and_the_kind_fits_the_question(committed, split):
    for source, kinds in QUESTION_KINDS.items():
        metas = [json.loads(m["json"]) for m in committed[split, source].values()]
        assert {m["kind"] for m in metas} == set(kinds), source  # every kind occurs, no other
    checks = {"shape_at": lambda m: m["answer"] in samples.SHAPES and m["instruction"].startswith("What shape is"),
              "colour_present": lambda m: m["answer"] in ("yes", "no"),
              "digit": lambda m: m["source"] == "sklearn-digits" and m["answer"].isdigit()}
    for meta in (json.loads(m["json"]) for m in committed[split, "vqa"].values()):
        if meta["kind"] in checks: assert checks[meta["kind"]](meta), meta
    for meta in (json.loads(m["json"]) for m in committed[split, "audio_qa"].values()):
        assert (meta["kind"] == "speed") == (meta["answer"] in ("fast", "slow")), meta


def test_about_half_the_instructions_carry_audio(committed):
    records = committed["train", "instruct"].values()
    share = sum("flac" in m for m in records) / len(records)
    assert 0.4 <= share <= 0.6
    match = [json.loads(m["json"]) for m in records if json.loads(m["json"])["kind"] == "match"]
    assert all({"png", "flac"} <= set(m) for m in records if json.loads(m["json"])["kind"] == "match")
    assert 0.4 <= sum(m["answer"] == "yes" for m in match) / len(match) <= 0.6


def test_both_16khz_and_48khz_flac_present(committed):
    rates, formats = defaultdict(int), defaultdict(int)
    for (split, source), records in committed.items():
        for m in records.values():
            if "flac" in m:
                info = sf.info(io.BytesIO(m["flac"]))
                assert info.format == "FLAC" and info.channels == 1
                rates[info.samplerate] += 1; formats[info.subtype] += 1
    assert set(rates) == {16000, 48000} and 0.08 < rates[48000] / sum(rates.values()) < 0.25
    assert set(formats) == {"PCM_S8", "PCM_16"}


def test_val_digits_never_appear_in_train(committed):
    def indices(split):
        found = set()
        for source in ("digits", "vqa"):
            for m in committed[split, source].values():
                meta = json.loads(m["json"])
                if meta["source"] == "sklearn-digits": found.add(meta["index"])
        return found
    train, val = indices("train"), indices("val")
    assert len(train) > 300 and len(val) > 50 and not train & val


def test_tokenizer_was_trained_on_the_samples():
    tok = TextTokenizer.from_file(SAMPLES / "tokenizer.json")
    assert tok.vocab_size >= 500 and tok.pad_id is not None and tok.eos_id is not None
    assert tok.decode(tok.encode("a large red circle at the top left")).strip() == "a large red circle at the top left"
    assert len(tok.encode("a large red circle at the top left")) <= 10  # the corpus's words are single tokens


# ---------------------------------------------------------------- the generator

def test_same_seed_gives_identical_bytes(tmp_path):
    samples.generate(tmp_path / "a", seed=0, limit=2)
    samples.generate(tmp_path / "b", seed=0, limit=2)
    samples.generate(tmp_path / "c", seed=1, limit=2)
    a, b, c = (folder_hashes(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 9 * 6 + 3
    assert a["train/scenes-000000.tar"] != c["train/scenes-000000.tar"]


SPEAK = """
import hashlib, json
import numpy as np
from r1_scratch.samples import ESPEAK_RATE, speech_clip, synthesize
waves = [synthesize("a large red circle at the top left", "en-us+f3", 160, 50) for _ in range(2)]
flac, meta = speech_clip("a small blue square in the centre", np.random.default_rng(0))
print(json.dumps(dict(seconds=len(waves[0]) / ESPEAK_RATE, peak=float(np.abs(waves[0]).max()),
                      rms=float(np.sqrt(np.mean(waves[0] ** 2))), same=waves[0].tobytes() == waves[1].tobytes(),
                      wave=hashlib.sha256(waves[0].tobytes()).hexdigest(), flac=hashlib.sha256(flac).hexdigest())))
"""


def test_speech_comes_from_pip_alone(tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    assert shutil.which("espeak-ng", path=venv_bin) is None  # no program to fall back on
    env = {**os.environ, "PATH": venv_bin, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", SPEAK], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    spoken = json.loads(run.stdout)
    assert 1.5 < spoken["seconds"] < 4 and spoken["peak"] > 0.3 and spoken["rms"] > 0.03, spoken  # speech, not silence
    assert spoken["same"]  # a second clip in the same process: the same bytes
    # this process has spoken other clips before: still the same bytes as that fresh one
    wave = samples.synthesize("a large red circle at the top left", "en-us+f3", 160, 50)
    assert hashlib.sha256(wave.tobytes()).hexdigest() == spoken["wave"]
    flac, meta = samples.speech_clip("a small blue square in the centre", np.random.default_rng(0))
    assert hashlib.sha256(flac).hexdigest() == spoken["flac"] and meta["seconds"] > 1


def test_missing_speech_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # as if the wheel were not installed: its import fails
    with pytest.raises(RuntimeError, match=r"espeak-ng's library.*`pip install espeakng-loader`"):
        samples.generate(tmp_path / "out", limit=1)
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(RuntimeError, match="pip install espeakng-loader"):
        samples.synthesize("hello")


def test_unloadable_speech_library_is_a_clear_error(tmp_path, monkeypatch):
    import espeakng_loader
    broken = tmp_path / "libespeak-ng.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: str(broken))
    with pytest.raises(RuntimeError, match="pip install espeakng-loader"):
        samples.synthesize("hello")


def test_cli_with_limit(tmp_path):
    out = tmp_path / "ds"
    run = subprocess.run([sys.executable, "-m", "r1_scratch.samples", "--out", str(out), "--seed", "3", "--limit", "1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == {"train": 9, "val": 9} and manifest["seed"] == 3
    assert len(list(out.glob("train/*.tar"))) == 36 and len(list(out.glob("val/*.tar"))) == 18
    assert TextTokenizer.from_file(out / "tokenizer.json").vocab_size > 256
    assert "9 train and 9 val records" in run.stdout
    assert "| `scenes` |" in (out / "README.md").read_text()
