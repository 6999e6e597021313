"""Model loading: local directories through the real transformers path, clear errors otherwise."""

import pytest
import torch

from musicrfm.engine.model import (
    RANDOM_MODELS,
    ModelLoadError,
    build_random_model,
    is_random_model,
    load_model,
    pick_dtype,
)


def test_local_directory_loads_through_transformers(tmp_path):
    hf, tok = build_random_model("tiny-random", seed=5)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert not model.is_random  # a directory is taken as real weights; nothing says noise
    assert model.fingerprint.num_layers == 4 and model.fingerprint.hidden_size == 32
    for (name, a), (_, b) in zip(hf.state_dict().items(), model.hf.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.tokenizer("piano")["input_ids"] == tok("piano")["input_ids"]


def test_random_models_are_seeded_and_labelled():
    a, b = load_model("tiny-random", seed=1), load_model("tiny-random", seed=1)
    assert a.is_random and "noise" in a.describe()
    assert all(torch.equal(x, y) for x, y in zip(a.hf.parameters(), b.hf.parameters()))
    assert a.frame_rate == 50.0 and a.sample_rate == 32000


def test_missing_weights_offline_names_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download facebook/musicgen-small"):
        load_model("facebook/musicgen-small")


def test_bad_directories_and_names(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "float8")


def test_cpu_defaults_to_float32():
    assert pick_dtype(torch.device("cpu")) == torch.float32


def test_random_models_are_known_by_name_before_loading():
    assert all(is_random_model(name) for name in RANDOM_MODELS)
    assert not is_random_model("musicgen-mini") and not is_random_model("facebook/musicgen-small")
    assert not is_random_model("random-huge")  # not a model load_model builds
    assert load_model("tiny-random").is_random == is_random_model("tiny-random")
