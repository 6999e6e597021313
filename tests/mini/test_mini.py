"""The bundled musicgen-mini, used as a user uses it: what it must be (small, documented, the default
model, with banks), what it must do (keep pitch through its codec, generate clear tones) and the
closed-loop proof that steering moves the sound (`musicrfm eval sweep`, judged by the independent
pitch check)."""

import asyncio
import csv
import json
import os
import wave
from pathlib import Path

import pytest
from safetensors import safe_open

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import BUNDLED_MODELS, bundled_banks, bundled_model_dir, bundled_prompts, load_model

from cli_runner import run_here
from live_server import start_server, stop_server

SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
needs_soundfont = pytest.mark.skipif(not os.path.isfile(SOUNDFONT), reason="TimGM6mb soundfont not installed")

# The closed-loop proof's settings (docs/musicgen-mini.md has the table they produce at full size).
PROOF_ETA = "0.1,0.5,1"  # relative strengths: fractions of each layer's typical norm


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
    from musicrfm.mini.health import check_codec

    result = check_codec(mini, clips=60, seed=1, progress=False)  # the clips docs/musicgen-mini.md reports
    assert result["originals_agreement"] >= 0.95  # the check itself reads these clips
    assert result["agreement"] >= 0.9, result


def test_generations_are_clear_tones_of_any_pitch_class(mini):
    from musicrfm.mini.health import check_generation

    result = check_generation(mini, samples=12, seconds=3.0, seed=2, progress=False)
    # a dominant class: well above a flat profile's 1/12 (the codec's own renders of notes reach ~0.37)
    assert result["median_confidence"] >= 0.15, result
    # unsteered, the pitch class is left to chance: no class takes over
    assert result["most_common_share"] <= 0.5 and sum(c > 0 for c in result["class_counts"]) >= 4, result


def test_mini_check_command_reports_codec_scale_and_generation(tmp_path):
    r = run_here("mini", "check", "--clips", "3", "--samples", "2", "--seconds", "1", "--out", tmp_path / "c.json",
                 "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["codec"]["clips"] == 3 and 0 <= report["codec"]["agreement"] <= 1
    assert len(report["residual_norm_per_layer"]) == 4 and all(n > 1 for n in report["residual_norm_per_layer"])
    assert report["generation"]["samples"] == 2 and sum(report["generation"]["class_counts"]) == 2


def test_default_model_generates_and_steers_out_of_the_box(tmp_path):
    out = tmp_path / "c.wav"
    r = run_here("generate", "--prompt", "piano note, middle register", "--seconds", "2", "--steer", "notes:C=0.5",
                 "--gate", "0.3", "--out", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "noise" not in r.stdout + r.stderr
    with wave.open(str(out)) as w:
        assert w.getframerate() == 16_000 and w.getnframes() == 100 * 320
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["model"] == "musicgen-mini" and side["random_weights"] is False
    assert [Path(b["path"]).name for b in side["banks"]] == ["chords.safetensors", "notes.safetensors"]
    # the bundled banks carry the model's layer norms (from extraction): relative strength needs no measuring
    assert side["steering"]["units"] == "relative" and side["layer_norms"]["source"].startswith("extraction")
    assert "carries no layer norms" not in r.stderr


def test_default_server_offers_the_bundled_knobs(tmp_path):
    from musicrfm.protocol.connection import Connection

    server = start_server(None, tmp_path, model=None)
    try:
        assert any("banks:" in line and "notes.safetensors" in line for line in server.output)

        async def hello():
            async with await Connection.open(server.ws_url()) as conn:
                return conn.hello

        message = asyncio.run(hello())
        assert message["model"] == "musicgen-mini" and message["random_weights"] is False
        assert {"notes:C", "notes:G", "chords:major", "chords:minor"} <= set(message["directions"])
    finally:
        assert stop_server(server) == 0


def _sweep_table(folder: Path, concept: str) -> tuple[dict, list[tuple[float, dict]]]:
    rows = list(csv.DictReader((folder / "results.csv").open()))
    reference = next(r for r in rows if r["group"].startswith("reference") and r["concept"] == concept)
    steered = sorted(((float(r["x"]), r) for r in rows if r["group"].startswith(f"{concept} eta0=")),
                     key=lambda item: item[0])
    return reference, steered


def test_closed_loop_steering_moves_the_pitch_class(tmp_path):
    """`musicrfm eval sweep --preset eta` on the defaults (musicgen-mini, its notes bank, its example prompts,
    paper gate p = 0.3 and exponential layer weighting): the independent pitch check's accuracy goes from
    about chance unsteered to >= 0.6, rising over the grid; FD and MMD² are reported beside it."""
    out = tmp_path / "proof"
    r = run_here("eval", "sweep", "--preset", "eta", "--concept", "notes", "--samples", "16", "--seconds", "3",
                 "--eta0", PROOF_ETA, "--out", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reference, steered = _sweep_table(out, "notes")
    assert [x for x, _ in steered] == [float(e) for e in PROOF_ETA.split(",")]
    chance = float(reference["check_acc"])
    accuracy = [float(row["check_acc"]) for _, row in steered]
    assert chance <= 0.25, (chance, accuracy)
    assert max(accuracy) >= 0.6, (chance, accuracy)
    # rising over the grid (one clip, 1/12 of the per-class mean at 16 samples, of slack between neighbours)
    assert all(b >= a - 0.09 for a, b in zip([chance, *accuracy], accuracy)), (chance, accuracy)
    assert accuracy[-1] - chance >= 0.4, (chance, accuracy)
    for _, row in steered:
        assert float(row["fd"]) > 0 and row["mmd2"] != "" and row["embedding"]
