"""Model loading: local directories through the real transformers path, clear errors otherwise."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from musicrfm.engine.model import (
    RANDOM_MODELS,
    ModelLoadError,
    build_random_model,
    bundled_model_dir,
    check_model_name,
    is_random_model,
    load_model,
    pick_dtype,
)

REPO = Path(__file__).resolve().parents[2]


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
    with pytest.raises(ModelLoadError, match="`hf download facebook/musicgen-small`") as caught:
        load_model("facebook/musicgen-small")
    assert "huggingface-cli" not in str(caught.value)  # the hub's current command, not the retired one


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


def test_names_that_are_no_model_fail_at_once_with_close_matches(tmp_path):
    with pytest.raises(ModelLoadError, match="did you mean musicgen-mini") as caught:
        check_model_name("musicgen-mni")
    assert "\n" not in str(caught.value)
    with pytest.raises(ModelLoadError, match="did you mean facebook/musicgen-small"):
        check_model_name("musicgen-small")  # a hub id without its owner
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_name("./no/such/dir")
    for name in ("musicgen-mini", "tiny-random", "random-large", "facebook/musicgen-small", "someone/a-model",
                 str(tmp_path)):
        assert check_model_name(name) == name  # hub ids and directories go on to be tried


def test_an_unknown_model_name_is_refused_before_any_hub_lookup(tmp_path):
    """`--model musicgen-mni`, as a user types it, with the hub reachable as far as the process knows (no
    HF_HUB_OFFLINE): one line with the close name, at once, never a download attempt."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "musicrfm", "generate", "--model", "musicgen-mni", "--out",
                        tmp_path / "x.wav"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'musicgen-mni'; did you mean musicgen-mini" in lines[0], r.stderr
    assert "download" not in r.stderr and elapsed < 60
    assert list(tmp_path.iterdir()) == []


def test_the_bundled_model_loads_without_token_id_warnings():
    """transformers checks the decoder's pad / BOS ids against [0, vocab_size); the bundled config leaves
    them unset (the id, 512, is the codebook size) so loading it prints nothing of the kind. In a fresh
    process with transformers' warnings on, as a script that imports the engine sees them."""
    code = ("from musicrfm.engine.model import load_model\n"
            "m = load_model('musicgen-mini', device='cpu')\n"
            "print('pad', m.pad_token_id, m.hf.generation_config.pad_token_id, m.hf.generation_config.bos_token_id)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pad 512 512 512" in r.stdout  # BOS and padding are still the codebook size where they are read
    for needle in ("pad_token_id", "bos_token_id", "within the vocabulary", "unexpected behavior"):
        assert needle not in r.stderr, r.stderr
    config = json.loads((bundled_model_dir("musicgen-mini") / "config.json").read_text())
    assert config["decoder"]["pad_token_id"] is None and config["decoder"]["vocab_size"] == 512


def test_bench_latency_labels_the_bundled_model_as_trained():
    """`bench/bench_latency.py --model musicgen-mini` says what it times: trained weights, not noise (the
    label comes from engine.model.is_random_model). Read up to that line, then stopped: the bench itself
    starts a server, which this test does not need."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    labels = {}
    for model in ("musicgen-mini", "tiny-random"):
        proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "bench_latency.py"), "--model", model,
                                 "--knobs", "0", "--sessions", ""], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                if line.startswith(f"model {model} "):
                    labels[model] = line
                    break
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert "trained weights" in labels["musicgen-mini"] and "noise" not in labels["musicgen-mini"]
    assert "random weights: noise" in labels["tiny-random"]
