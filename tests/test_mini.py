"""The bundled musicgen-mini, used as a user uses it: what it must be (small, documented, the default
model, with banks), what it must do (keep pitch through its codec, generate clear tones) and the
closed-loop proof that steering moves the sound (`musicrfm eval sweep`, judged by the independent
pitch check)."""

import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from engine.bank import DirectionBank
from engine.model import BUNDLED_MODELS, bundled_banks, bundled_model_dir, bundled_prompts, load_model

from .conftest import start_server, stop_server

SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
needs_soundfont = pytest.mark.skipif(not os.path.isfile(SOUNDFONT), reason="TimGM6mb soundfont not installed")
CLI = [shutil.which("musicrfm")] if shutil.which("musicrfm") else [sys.executable, "-m", "engine.cli"]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{sys.prefix}/bin:/usr/bin:/bin"}

# The closed-loop proof's settings (docs/musicgen-mini.md has the table they produce at full size).
PROOF_ETA = "__ETA__"


def run(*args, cwd, timeout=900):
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def mini():
    return load_model("musicgen-mini", device="cpu")


def test_bundled_model_is_small_documented_and_has_banks(mini):
    assert "musicgen-mini" in BUNDLED_MODELS
    folder = bundled_model_dir("musicgen-mini")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 30_000_000, f"{total / 1e6:.1f} MB"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"F16"}
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["corpus"]["seed"] == 0 and recipe["corpus"]["clips"] == 9520
    assert recipe["codec"]["cpu_hours"] > 0 and recipe["lm"]["cpu_hours"] > 0 and recipe["lm"]["steps"] > 1000
    assert bundled_prompts("musicgen-mini") and all("register" in p for p in bundled_prompts("musicgen-mini"))
    assert not mini.is_random and mini.sample_rate == 16_000 and mini.frame_rate == 50
    assert type(mini.hf).__name__ == "MusicgenForConditionalGeneration"
    banks = {p.stem: DirectionBank.load(p) for p in bundled_banks("musicgen-mini")}
    assert set(banks) == {"notes", "chords"}
    assert sorted(banks["notes"].concepts["notes"]) == sorted(
        ["A", "A#", "B", "C", "C#", "D", "D#", "E", "F", "F#", "G", "G#"])
    for bank in banks.values():
        bank.check_compatible(mini.fingerprint)


@needs_soundfont
def test_codec_keeps_the_pitch_class_of_held_out_clips(mini):
    from probes.mini.check import check_codec

    result = check_codec(mini, clips=30, seed=5, progress=False)
    assert result["originals_agreement"] >= 0.95  # the check itself reads these clips
    assert result["agreement"] >= 0.9, result


def test_generations_are_clear_tones_of_any_pitch_class(mini):
    from probes.mini.check import check_generation

    result = check_generation(mini, samples=12, seconds=3.0, seed=2, progress=False)
    # a clear dominant class: far above a flat profile's 1/12
    assert result["median_confidence"] >= 0.3, result
    # unsteered, the pitch class is left to chance: no class takes over
    assert result["most_common_share"] <= 0.5 and sum(c > 0 for c in result["class_counts"]) >= 4, result


def test_default_model_generates_and_steers_out_of_the_box(tmp_path):
    out = tmp_path / "c.wav"
    r = run("generate", "--prompt", "piano note, middle register", "--seconds", "2", "--steer", "notes:C=__COEF__",
            "--gate", "0.3", "--out", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "noise" not in r.stdout + r.stderr
    with wave.open(str(out)) as w:
        assert w.getframerate() == 16_000 and w.getnframes() == 100 * 320
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["model"] == "musicgen-mini" and side["random_weights"] is False
    assert [Path(b["path"]).name for b in side["banks"]] == ["chords.safetensors", "notes.safetensors"]


def test_default_server_offers_the_bundled_knobs(tmp_path):
    from websockets.asyncio.client import connect

    server = start_server(None, tmp_path, model=None)
    try:
        assert any("banks:" in line and "notes.safetensors" in line for line in server.output)

        async def hello():
            async with connect(server.ws_url()) as ws:
                return json.loads(await ws.recv())

        message = asyncio.run(hello())
        assert message["model"] == "musicgen-mini" and message["random_weights"] is False
        assert {"notes:C", "notes:G", "chords:major", "chords:minor"} <= set(message["directions"])
    finally:
        assert stop_server(server) == 0
