import pytest
import torch
from transformers.utils import logging as hf_logging

from engine.model import load_model

hf_logging.set_verbosity_error()
# The test models are tiny: intra-op threads only add wake-up latency (10x slower on the 2-core CI box).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """The built-in random-weight model (its audio is noise): real classes, tiny sizes."""
    return load_model("tiny-random")


@pytest.fixture
def hf_codes(tiny, monkeypatch):
    """Run transformers' own `generate` and return the codes it decoded: [K, frames]."""

    def run(prompt: str, max_new_tokens: int, **kwargs):
        seen = {}
        decode = tiny.hf.audio_encoder.decode

        def spy(codes, *a, **k):
            seen["codes"] = codes
            return decode(codes, *a, **k)

        monkeypatch.setattr(tiny.hf.audio_encoder, "decode", spy)
        inputs = tiny.tokenizer([prompt], return_tensors="pt", padding=True)
        tiny.hf.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        monkeypatch.undo()
        return seen["codes"][0, 0]

    return run


# --- a live server (tests of the public protocol speak to a real `musicrfm serve` process) -------------

import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402


@pytest.fixture(scope="session")
def test_bank_path(tmp_path_factory) -> Path:
    """A bank of two random directions (notes:C, notes:G) for tiny-random."""
    from engine.bank import DirectionBank

    fp = load_model("tiny-random").fingerprint
    g = torch.Generator().manual_seed(0)
    bank = DirectionBank.from_arrays("notes", ["C", "G"], torch.randn(2, fp.num_layers, fp.hidden_size, generator=g),
                                     torch.rand(2, fp.num_layers, generator=g), fp, method="test", pooling="mean")
    path = tmp_path_factory.mktemp("live-bank") / "notes.safetensors"
    bank.save(path)
    return path


@dataclass
class LiveServer:
    process: subprocess.Popen
    host: str
    port: int
    osc_port: int
    record_dir: Path
    bank_path: Path
    output: list[str] = field(default_factory=list)  # the server's stdout+stderr lines so far

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def ws_url(self, session: str = "main", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"session": session, **params}.items())
        return f"ws://{self.host}:{self.port}/ws?{query}"


def start_server(bank_path: Path | None, record_dir: Path, *extra: str, timeout: float = 120,
                 model: str | None = "tiny-random") -> LiveServer:
    """`musicrfm serve` on free ports; bank_path / model None: the server's defaults (musicgen-mini and
    its bundled banks)."""
    cmd = [sys.executable, "-m", "engine.cli", "serve", *(["--model", model] if model else []),
           *(["--bank", str(bank_path)] if bank_path else []),
           "--port", "0", "--osc-port", "0", "--record-dir", str(record_dir), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # keep reading so the pipe never fills; tests can look at what the server said
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("musicrfm serve did not start:\n" + "\n".join(lines))
    text = "\n".join(lines)
    page = re.search(r"page: http://([\d.]+):(\d+)/", text)
    osc = re.search(r"osc: udp [\d.]+:(\d+)", text)
    return LiveServer(proc, page.group(1), int(page.group(2)), int(osc.group(1)), record_dir, bank_path, lines)


def stop_server(server: LiveServer) -> int:
    """SIGINT, as Ctrl-C does: the server must shut down cleanly."""
    server.process.send_signal(signal.SIGINT)
    try:
        return server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, test_bank_path):
    """`musicrfm serve --model tiny-random` in a subprocess on free ports (one per test module)."""
    server = start_server(test_bank_path, tmp_path_factory.mktemp("recordings"))
    yield server
    code = stop_server(server)
    assert code == 0, "the server did not shut down cleanly:\n" + "\n".join(server.output)
