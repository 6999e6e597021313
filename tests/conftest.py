"""Fixtures for every test package: the tiny random-weight model and a small direction bank for it.
The live-server harness (a real `musicrfm serve` process) is in live_server.py; its fixture is registered
here so every test folder can ask for it."""

from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from live_server import live_server  # noqa: F401  (the fixture, registered for every test folder)
from musicrfm.engine.model import load_model

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


@pytest.fixture(scope="session")
def test_bank_path(tmp_path_factory) -> Path:
    """A bank of two random directions (notes:C, notes:G) for tiny-random."""
    from musicrfm.engine.bank import DirectionBank, LayerNorms

    fp = load_model("tiny-random").fingerprint
    g = torch.Generator().manual_seed(0)
    # tiny-random's typical |h| is about 4 at every layer (engine.norms.measure_layer_norms): given here, so that
    # no server start measures it again (tests of measuring use banks without them)
    norms = LayerNorms((4.0,) * fp.num_layers, (0.5,) * fp.num_layers, 100, "test: tiny-random")
    bank = DirectionBank.from_arrays("notes", ["C", "G"], torch.randn(2, fp.num_layers, fp.hidden_size, generator=g),
                                     torch.rand(2, fp.num_layers, generator=g), fp, method="test", pooling="mean",
                                     layer_norms=norms)
    path = tmp_path_factory.mktemp("live-bank") / "notes.safetensors"
    bank.save(path)
    return path
