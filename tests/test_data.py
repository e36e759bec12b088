"""The data pipeline as a user meets it: bad shards, mixtures, budgets, determinism, resume, splitting."""
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from r1_scratch.config import get_preset, with_data_root
from r1_scratch.data import (DecodeSpec, Loader, StreamSpec, TextTokenizer, build_loader, chat_ids, decode_audio,
                             source_shards)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"
SFT = {"instruct": 0.6, "reasoning": 0.2, "vqa": 0.15, "audio_qa": 0.05}


def repo_config(**data):
    "The tiny preset with its data paths pointing into this checkout."
    cfg = with_data_root(get_preset("tiny"), REPO)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def keys(loader, n):
    return [b["key"] for _, b in zip(range(n), loader)]


# ---------------------------------------------------------------- building shards by hand

def png_bytes(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 330 * t)).astype("float32"), rate, format="FLAC")
    return buf.getvalue()


def good_record(i):
    return {"png": png_bytes(i), "txt": f"a record number {i}".encode(),
            "json": json.dumps({"task": "caption"}).encode()}


def write_shard(path, records):
    "records: list of (key, {ext: bytes})."
    with tarfile.open(path, "w") as tar:
        for key, members in records:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def stream_spec(pattern, tokenizer, train=False, **kw):
    return StreamSpec(sources=source_shards(pattern), weights={"all": 1.0}, tokenizer=str(tokenizer),
                      decode=DecodeSpec(32, 16000, 6.0), train=train, **kw)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    "A WordPiece tokenizer with BERT's special-token names: any tokenizer.json must work."
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator([f"a record number {i} what colour is it red blue" for i in range(50)], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ---------------------------------------------------------------- corrupt records

def test_each_kind_of_corrupt_record_is_skipped_and_counted(tmp_path, bert_tokenizer):
    records = [(f"good-{i:03d}", good_record(i)) for i in range(6)]
    records += [
        ("bad-image", {"png": b"\x89PNG\r\n\x1a\n truncated", "txt": b"x"}),
        ("bad-audio", {"flac": flac_bytes(0.5, 16000)[:40], "txt": b"x"}),
        ("bad-json", {"json": b'{"task": "caption",', "txt": b"x"}),
        ("bad-task", {"json": b'{"task": "juggling"}', "txt": b"x"}),
        ("bad-text", {"txt": b"\xff\xfe\xfa not utf-8"}),
        ("empty", {"json": b"{}"}),
    ]
    write_shard(tmp_path / "set-000000.tar", records)
    write_shard(tmp_path / "set-000001.tar", [(f"more-{i:03d}", good_record(100 + i)) for i in range(20)])
    whole = (tmp_path / "set-000001.tar").read_bytes()
    (tmp_path / "set-000001.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member

    loader = Loader(stream_spec(str(tmp_path / "set-{000000..000001}.tar"), bert_tokenizer, batch_size=4))
    seen = [k for b in loader for k in b["key"]]

    assert dict(loader.skipped) == {"image": 1, "audio": 1, "json": 2, "text": 1, "empty": 1, "shard": 1}
    assert [k for k in seen if k.startswith("good")] == [f"good-{i:03d}" for i in range(6)]
    assert 0 < sum(k.startswith("more") for k in seen) < 20  # what came before the cut survives
    assert "skipped corrupt records: 7" in loader.summary()


def test_corrupt_counts_reach_the_main_process_from_workers(tmp_path, bert_tokenizer):
    for s in range(2):
        recs = [(f"s{s}-{i}", good_record(i)) for i in range(5)] + [(f"s{s}-bad", {"png": b"junk", "txt": b"x"})]
        write_shard(tmp_path / f"w-00000{s}.tar", recs)
    loader = Loader(stream_spec(str(tmp_path / "w-{000000..000001}.tar"), bert_tokenizer, batch_size=3),
                    num_workers=2)
    n = sum(len(b["key"]) for b in loader)
    assert n == 10 and loader.skipped["image"] == 2


def test_missing_shard_and_bad_tokenizer_name_the_file(tmp_path, bert_tokenizer):
    write_shard(tmp_path / "a-000000.tar", [("k", good_record(0))])
    with pytest.raises(FileNotFoundError, match="a-000001.tar"):
        source_shards(str(tmp_path / "a-{000000..000001}.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        TextTokenizer.from_file(tmp_path / "nowhere.json")
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="broken.json"):
        TextTokenizer.from_file(tmp_path / "broken.json")


def test_too_few_shards_for_the_readers_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_loader(repo_config(), "val", {"vqa": 1.0}, num_workers=2)  # 2 shards, 4 readers
    with pytest.raises(ValueError, match="source 'vqa' has 2 shard"):
        next(iter(loader))


# ---------------------------------------------------------------- mixtures and budgets

def test_mixture_ratios_match_the_weights():
    loader = build_loader(repo_config(), "train", SFT, batch_size=50)
    seen = Counter(s for _, b in zip(range(60), loader) for s in b["source"])
    total = sum(seen.values())
    assert total == 3000
    for name, weight in SFT.items():
        assert abs(seen[name] / total - weight) < 0.025, (name, seen[name] / total)


def test_token_budget_is_respected_and_batches_vary():
    budget = 1024
    loader = build_loader(repo_config(), "train", SFT, max_tokens=budget, batch_size=64)
    sizes = []
    for _, b in zip(range(40), loader):
        n = len(b["key"])
        sizes.append(n)
        if n > 1:
            assert n * int(b["cost"].max()) <= budget
            assert b["input_ids"].numel() <= budget and b["text_ids"].numel() <= budget
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        # one set of prefix blocks per batch: no row pads another's image or audio block
        assert len(set(b["has_image"].tolist())) == 1 and len(set(b["has_audio"].tolist())) == 1
    assert loader.oversize == 0
    assert max(sizes) > 2 * min(sizes)  # short and long samples give different batch sizes


def test_labels_cover_only_the_response():
    tok = TextTokenizer.from_file(SAMPLES / "tokenizer.json")
    ids, labels = chat_ids(tok, "What colour is the square?", "blue", 64)
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(answer).strip() == "blue" and answer[-1] == tok.eos_id
    b = next(iter(build_loader(repo_config(), "train", {"vqa": 1.0}, batch_size=8)))
    targets = (b["labels"] != -100).sum(1)
    assert ((targets > 0) & (targets < b["attention_mask"].sum(1))).all()


# ---------------------------------------------------------------- determinism and resume

@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_gives_same_batches(workers):
    cfg = repo_config()
    a = keys(build_loader(cfg, "train", SFT, batch_size=8, num_workers=workers), 8)
    b = keys(build_loader(cfg, "train", SFT, batch_size=8, num_workers=workers), 8)
    c = keys(build_loader(cfg, "train", SFT, batch_size=8, num_workers=workers, seed=7), 8)
    assert a == b and a != c


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_position_gives_the_following_batches(workers):
    cfg = repo_config()
    reference = keys(build_loader(cfg, "train", SFT, max_tokens=1024, batch_size=32, num_workers=workers), 10)
    first = build_loader(cfg, "train", SFT, max_tokens=1024, batch_size=32, num_workers=workers)
    keys(first, 6)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = build_loader(cfg, "train", SFT, max_tokens=1024, batch_size=32, num_workers=workers)
    resumed.load_state_dict(state)
    assert state["position"] == 6
    assert keys(resumed, 4) == reference[6:]


def test_ranks_read_disjoint_shards_that_cover_the_split(monkeypatch):
    cfg = repo_config()
    everything = [k for b in build_loader(cfg, "val", {"vqa": 1.0}) for k in b["key"]]
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([k for b in build_loader(cfg, "val", {"vqa": 1.0}) for k in b["key"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything) and len(everything) == len(set(everything))


# ---------------------------------------------------------------- decoding

def test_48khz_audio_is_resampled_to_the_model_rate():
    shards = source_shards(str(SAMPLES / "train/{task}-{000000..000003}.tar"), {"speech": 1})["speech"]
    found = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".flac"):
                    data = tar.extractfile(m).read()
                    info = sf.info(io.BytesIO(data))
                    if info.samplerate == 48000:
                        wave = decode_audio(data, 16000, max_seconds=None)
                        assert abs(len(wave) - info.frames / 3) <= 2
                        found += 1
    assert found > 0


def test_any_tokenizer_json_works(bert_tokenizer):
    tok = TextTokenizer.from_file(bert_tokenizer)
    assert (tok.pad_id, tok.mask_id) == (0, 4) and tok.bos_id == 2 and tok.eos_id == 3
    ids, labels = chat_ids(tok, "what colour", "red", 32)  # no chat-role tokens: still a prompt/response split
    assert ids[0] == tok.bos_id and labels.count(-100) == len(ids) - 2
    cfg = repo_config(tokenizer=str(bert_tokenizer))
    b = next(iter(build_loader(cfg, "train", {"vqa": 1.0}, batch_size=4)))
    assert b["input_ids"].max() < tok.vocab_size


# ---------------------------------------------------------------- the command line

def test_data_cli_reports_the_mixture(tmp_path):
    out = subprocess.run([sys.executable, "-m", "r1_scratch.data", "--stage", "sft", "--batches", "8"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["batches"] == 8 and set(report["share"]) <= set(SFT) and report["skipped"] == {}
    assert report["decoder_padding"] < 0.2  # sorted by cost alone, prefix blocks mixed: 0.31 in these 8 batches


def test_data_cli_names_a_bad_override():
    out = subprocess.run([sys.executable, "-m", "r1_scratch.data", "data.batch_sise=3"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "batch_sise" in out.stderr


def test_workers_start_from_a_fork_server_once_cuda_is_in_use(monkeypatch):
    "A process that has initialised CUDA must not fork its loader workers: they start clean and give the same batches."
    import r1_scratch.runtime as runtime
    cfg = repo_config()
    forked = keys(build_loader(cfg, "train", SFT, batch_size=8, num_workers=2), 6)
    monkeypatch.setattr(runtime.torch.cuda, "is_initialized", lambda: True)
    assert runtime.worker_start_method() == "forkserver"
    loader = build_loader(cfg, "train", SFT, batch_size=8, num_workers=2)
    assert loader._dataloader().multiprocessing_context.get_start_method() == "forkserver"
    assert keys(loader, 6) == forked
