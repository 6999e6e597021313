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
