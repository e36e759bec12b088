"""The TorchServe server as a client meets it: real processes on free 127.0.0.1 ports, answers equal to the Predictor's,
every kind of bad request refused with a 4xx and a message, and a clean stop."""
import base64
import io
import os
import socket
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import soundfile as sf
import torch
from PIL import Image

from r1_scratch.config import apply_overrides, config_to_dict, get_preset, with_data_root
from r1_scratch.model import R1Model
from r1_scratch.runtime import Runtime
from r1_scratch.serve import PORT_NAMES, Predictor, TorchServe, build_archive
from r1_scratch.trainer import Checkpoints

pytest.importorskip("ts", reason="needs the serve extra: pip install -e '.[serve]'")
REPO = Path(__file__).resolve().parent.parent


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes() -> bytes:
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[8:40, 16:48] = (220, 40, 40)  # a red square
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def wav_bytes(seconds: float, rate: int) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32"), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


GOOD = {"text": {"text": "What is 2 + 3?"},
        "image": {"text": "What colour is the shape?", "image": b64(png_bytes())},
        "audio": {"text": "Which shape is mentioned?", "audio": b64(wav_bytes(2.0, 44100))},  # not the model's 16 kHz
        "short": {"text": "Count to three.", "max_new_tokens": 3}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    "A fresh tiny model saved as the trainer saves it; untied, so that its greedy answers are not empty."
    cfg = with_data_root(apply_overrides(get_preset("tiny"), ["model.tie_embeddings=false"]), REPO)
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    meta = dict(step=0, stage="init", config=config_to_dict(cfg))
    Checkpoints(run / "checkpoints").save(0, R1Model(cfg.model), {}, meta, Runtime(torch.device("cpu")))
    return run


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.load(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    build_archive(checkpoint, store)
    ts = TorchServe(store, tmp_path_factory.mktemp("server")).start()
    yield ts
    ts.stop()


def post(server, **kwargs):
    return requests.post(server.url, timeout=120, **kwargs)


def test_listens_on_loopback_only(server):
    listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert set(server.ports) == set(PORT_NAMES)
    for name, port in server.ports.items():
        assert listening.get(port) in ("127.0.0.1", "::ffff:127.0.0.1"), f"{name} port {port}: {listening.get(port)}"


@pytest.mark.parametrize("kind", list(GOOD))
def test_answers_equal_predictor(server, predictor, kind):
    reply = post(server, json=GOOD[kind])
    assert reply.status_code == 200, reply.text
    expected = predictor.predict([GOOD[kind]])[0]
    assert reply.json()["answer"] == expected["answer"] and expected["answer"]
    assert reply.json()["tokens"] == GOOD[kind].get("max_new_tokens", 16)
    assert reply.json()["prefill_ms"] > 0


BAD = {
    "invalid base64": (dict(json={"text": "hi", "image": "this is not base64!"}), 400, "not valid base64"),
    "not an image": (dict(json={"text": "hi", "image": b64(b"%PDF-1.4 a document")}), 400, "not a PNG"),
    "empty body": (dict(data=b"", headers={"Content-Type": "application/json"}), 400, "empty"),
    "ten minutes of audio": (dict(json={"text": "hi", "audio": b64(wav_bytes(600, 8000))}), 400, "600.0 s long"),
    "50 MB body": (dict(json={"text": "x" * (50 * 2**20)}), 413, "50.0 MB"),
    "unknown fields": (dict(json={"text": "hi", "temperature": 0.7}), 400, "unknown field(s) ['temperature']"),
    "wrong content type": (dict(data=b"text=hi", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
                           "application/json"),
    "not JSON": (dict(data=b"{text: hi}", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    "no input": (dict(json={"max_new_tokens": 4}), 400, "empty request"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_4xx_with_message(server, predictor, name):
    kwargs, status, message = BAD[name]
    reply = post(server, **kwargs)
    assert reply.status_code == status, reply.text[:300]
    assert message in reply.json()["error"]
    after = post(server, json=GOOD["text"])  # the server still answers
    assert after.status_code == 200 and after.json()["answer"] == predictor.predict([GOOD["text"]])[0]["answer"]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try: s.bind(("127.0.0.1", port))
        except OSError: return False
        return True


def test_clean_stop(server):
    group = server.process.pid
    members = [p for p in psutil.process_iter(["pid"]) if _group_of(p.pid) == group]
    assert len(members) >= 3  # the torchserve CLI, the Java frontend, a Python worker
    server.stop()
    assert server.process is None
    assert not [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert all(port_free(port) for port in server.ports.values()), server.ports


def _group_of(pid: int) -> int | None:
    try: return os.getpgid(pid)
    except ProcessLookupError: return None


def test_predictor_loads_compressed_and_trainer_files(checkpoint, predictor, tmp_path):
    from r1_scratch.compress import compress, save_compressed
    weights = next(checkpoint.glob("checkpoints/step_*/model.safetensors"))
    same = Predictor.load(weights)  # the trainer's safetensors file itself
    assert same(text="hi")["answer"] == predictor(text="hi")["answer"]
    path = save_compressed(compress(Predictor.load(checkpoint).model, "bf16"), tmp_path / "bf16", predictor.cfg, "bf16")
    answer = Predictor.load(path)(text="hi", max_new_tokens=4)
    assert answer["tokens"] == 4 and next(Predictor.load(path).model.parameters()).dtype == torch.bfloat16
