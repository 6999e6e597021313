"""`musicrfm generate` run as a user runs it: a subprocess, real files, exit codes and messages."""

import json
import shutil
import subprocess
import sys
import wave

import pytest
import torch

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import ModelFingerprint

CLI = [shutil.which("musicrfm")] if shutil.which("musicrfm") else [sys.executable, "-m", "musicrfm"]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def run(*args, cwd):
    env = dict(ENV, PATH=f"{sys.prefix}/bin:/usr/bin:/bin")
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bank_file(test_bank_path):
    return test_bank_path


def test_generate_steered_writes_wav_and_sidecar_that_regenerates(tmp_path, bank_file):
    out = tmp_path / "take.wav"
    r = run("generate", "--model", "tiny-random", "--prompt", "warm piano", "--seconds", "1.5", "--out", out, "--bank", bank_file,
            "--steer", "notes:C=2.5@linear_rise:length=30", "--crossfade", "notes:C,notes:G=1.0@start=10,length=40",
            "--gate", "0.5", "--layers", "topk:k=2", "--seed", "3", "--chunk-steps", "7", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "noise" in r.stdout  # random weights are never passed off as music
    with wave.open(str(out)) as w:
        assert w.getframerate() == 32000 and w.getnchannels() == 1
        assert w.getnframes() == 75 * 640  # 1.5 s = 75 frames of 640 samples
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["random_weights"] is True and side["frames"] == 75
    assert side["steering"]["gate_p"] == 0.5 and len(side["steering"]["controls"]) == 3
    assert side["steering"]["layers"] == {"mode": "topk", "k": 2, "w0": 1.0}

    again = tmp_path / "again.wav"
    r = run("generate", "--from-sidecar", out.with_suffix(".json"), "--out", again, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(again.with_suffix(".json").read_text())["tokens_sha256"] == side["tokens_sha256"]
    # Same settings without steering: different tokens (the steering did something).
    plain = tmp_path / "plain.wav"
    r = run("generate", "--model", "tiny-random", "--prompt", "warm piano", "--seconds", "1.5", "--out", plain, "--seed", "3", "--quiet",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(plain.with_suffix(".json").read_text())["tokens_sha256"] != side["tokens_sha256"]


@pytest.mark.parametrize("args, message", [
    (["--steer", "notes:C=nan"], "finite"),
    (["--steer", "notes:Q=0.3"], "notes:Q"),
    (["--steer", "notesC=0.3"], "CONCEPT:CLASS=COEF"),
    (["--steer", "notes:C=0.3@wobble"], "unknown schedule 'wobble'"),
    (["--gate", "1.5"], "gate_p"),
    (["--layers", "topk:k=0"], "k must be >= 1"),
    (["--seconds", "0"], "seconds"),
])
def test_bad_settings_get_one_clear_line(tmp_path, bank_file, args, message):
    r = run("generate", "--model", "tiny-random", "--out", tmp_path / "x.wav", "--bank", bank_file, "--quiet", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.wav").exists()


def test_bad_banks_are_named(tmp_path, bank_file):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file" * 10)
    r = run("generate", "--model", "tiny-random", "--bank", corrupt, "--steer", "notes:C=0.3", "--out", tmp_path / "x.wav", cwd=tmp_path)
    assert r.returncode == 2 and str(corrupt) in r.stderr and "Traceback" not in r.stderr

    big = ModelFingerprint("musicgen", 48, 2048)
    other = tmp_path / "large.safetensors"
    DirectionBank.from_arrays("notes", ["C"], torch.randn(1, 48, 2048), torch.ones(1, 48), big, method="m",
                              pooling="mean").save(other)
    r = run("generate", "--model", "tiny-random", "--bank", other, "--steer", "notes:C=0.3", "--out", tmp_path / "x.wav", cwd=tmp_path)
    assert r.returncode == 2
    assert "48 layers x hidden size 2048" in r.stderr and "4 layers x hidden size 32" in r.stderr

    r = run("generate", "--model", "tiny-random", "--bank", tmp_path / "missing.safetensors", "--out", tmp_path / "x.wav", cwd=tmp_path)
    assert r.returncode == 2 and "missing.safetensors" in r.stderr
