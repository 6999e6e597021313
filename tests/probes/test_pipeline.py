"""The offline pipeline end to end as a user runs it, on tiny-random (its audio is noise):
`musicrfm data syntheory` (two concepts, a small preset) -> `musicrfm extract` -> `musicrfm train`
-> `musicrfm generate` steered with the bank that came out."""

import json
from pathlib import Path

import pytest

from musicrfm.engine.bank import DirectionBank
from musicrfm.probes.syntheory import DEFAULT_SOUNDFONT, Preset, render_dataset

from cli_runner import run_here

pytestmark = pytest.mark.skipif(not Path(DEFAULT_SOUNDFONT).is_file(),
                                reason="needs Debian's timgm6mb-soundfont (CI installs it)")


def run(*args, cwd):
    """The command in this process (cli_runner.run_here): the pipeline's steps, not Python's start-up, are tested."""
    r = run_here(*args, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_render_extract_train_generate(tmp_path):
    # Three instruments x two octaves: every class keeps enough clips for a train/validation/test split.
    small = Preset("test", programs=(0, 24, 40), note_octaves=(3, 4))
    counts = render_dataset(tmp_path / "data", concepts=("notes", "chords"), preset=small, workers=2,
                            progress=False)
    assert counts == {"notes": 12 * 6, "chords": 4 * 12 * 3 * 3}

    run("extract", "--model", "tiny-random", "--data", tmp_path / "data", "--concepts", "notes,chords",
        "--out", tmp_path / "features", "--quiet", cwd=tmp_path)
    r = run("train", "--features", tmp_path / "features", "--concepts", "notes,chords", "--out", tmp_path / "banks",
            "--method", "rfm", "--trials", "2", "--quiet", cwd=tmp_path)
    assert "notes [rfm]" in r.stdout and "chords [rfm]" in r.stdout
    notes = DirectionBank.load(tmp_path / "banks" / "notes.rfm.safetensors")
    chords = DirectionBank.load(tmp_path / "banks" / "chords.rfm.safetensors")
    assert notes.concepts["notes"][:3] == ["C", "C#", "D"] and len(notes.concepts["notes"]) == 12
    assert len(chords.concepts["chords"]) == 4

    out = tmp_path / "steered.wav"
    run("generate", "--model", "tiny-random", "--seconds", "1", "--out", out,
        "--bank", tmp_path / "banks" / "notes.rfm.safetensors", "--bank", tmp_path / "banks" / "chords.rfm.safetensors",
        "--steer", f"notes:{notes.concepts['notes'][0]}=0.45", "--steer", f"chords:{chords.concepts['chords'][0]}=0.3",
        "--gate", "0.3", "--quiet", cwd=tmp_path)
    side = json.loads(out.with_suffix(".json").read_text())
    assert [c["key"] for c in side["steering"]["controls"]] == [f"notes:{notes.concepts['notes'][0]}",
                                                                f"chords:{chords.concepts['chords'][0]}"]
    assert out.stat().st_size == 44 + 2 * 32000
