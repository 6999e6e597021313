"""`musicrfm generate` run as a user runs it: a subprocess, real files, exit codes and messages."""

import json
import wave

import pytest
import torch

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import ModelFingerprint

from cli_runner import run, run_here


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
    r = run_here("generate", "--from-sidecar", out.with_suffix(".json"), "--out", again, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(again.with_suffix(".json").read_text())["tokens_sha256"] == side["tokens_sha256"]
    # Same settings without steering: different tokens (the steering did something).
    plain = tmp_path / "plain.wav"
    r = run_here("generate", "--model", "tiny-random", "--prompt", "warm piano", "--seconds", "1.5", "--out", plain, "--seed",
                 "3", "--quiet", cwd=tmp_path)
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
    r = run_here("generate", "--model", "tiny-random", "--out", tmp_path / "x.wav", "--bank", bank_file, "--quiet", *args,
                 cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.wav").exists()


def test_bad_banks_are_named(tmp_path, bank_file):
    # In this process: what is tested is the message and the exit code (an exception would end the test itself).
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file" * 10)
    r = run_here("generate", "--model", "tiny-random", "--bank", corrupt, "--steer", "notes:C=0.3", "--out",
                 tmp_path / "x.wav", cwd=tmp_path)
    assert r.returncode == 2 and str(corrupt) in r.stderr and "Traceback" not in r.stderr

    big = ModelFingerprint("musicgen", 48, 2048)
    other = tmp_path / "large.safetensors"
    DirectionBank.from_arrays("notes", ["C"], torch.randn(1, 48, 2048), torch.ones(1, 48), big, method="m",
                              pooling="mean").save(other)
    r = run_here("generate", "--model", "tiny-random", "--bank", other, "--steer", "notes:C=0.3", "--out",
                 tmp_path / "x.wav", cwd=tmp_path)
    assert r.returncode == 2
    assert "48 layers x hidden size 2048" in r.stderr and "4 layers x hidden size 32" in r.stderr

    r = run_here("generate", "--model", "tiny-random", "--bank", tmp_path / "missing.safetensors", "--out",
                 tmp_path / "x.wav", cwd=tmp_path)
    assert r.returncode == 2 and "missing.safetensors" in r.stderr


# --- refused before the model loads ------------------------------------------------------------------------

EARLY = {
    # the bundled model's own banks hold notes:C..B: the error names the key and the bank's close keys
    "unknown-direction": (["--steer", "notes:H=50"], ["no direction 'notes:H'", "did you mean 'notes:G'"]),
    "missing-bank": (["--bank", "missing.safetensors", "--steer", "notes:C=1"], ["missing.safetensors"]),
    "negative-seconds": (["--seconds", "-1"], ["--seconds must be > 0"]),
    "zero-seconds": (["--seconds", "0"], ["--seconds must be > 0"]),
    "absurd-seconds": (["--seconds", "1e308"], ["--seconds must be > 0 and at most 86400"]),
    "nan-seconds": (["--seconds", "nan"], ["--seconds must be finite"]),
    "negative-context": (["--context-seconds", "-1"], ["--context-seconds must be in"]),
    "nan-keep": (["--keep-seconds", "nan"], ["--keep-seconds must be finite"]),
    "out-in-proc": (["--out", "/proc/x.wav"], ["--out /proc/x.wav: cannot write in /proc"]),
    "out-a-directory": (["--out", "{tmp}"], ["is a directory"]),
    "out-missing-folder": (["--out", "{tmp}/no/such/take.wav"], ["the folder", "does not exist"]),
    "unknown-model": (["--model", "musicgen-mni"], ["did you mean musicgen-mini"]),
}


@pytest.mark.parametrize("name", list(EARLY))
def test_mistakes_are_refused_before_the_model_loads(tmp_path, name):
    """On the bundled model (the default), as a first-time user runs it: one line naming the problem, exit 2,
    no "model: ..." line (printed once the model has loaded), no file or folder left behind."""
    args, needles = EARLY[name]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "take.wav")]
    # In this process (the subprocess start was 3 s of each case): the exit code, stderr and files are the same.
    r = run_here("generate", "--prompt", "piano note, middle register", "--seconds", "1", *args, "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("musicrfm: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "model:" not in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no WAV, no sidecar, no folder made, no probe file left


def _gate_run(tmp_path, bank_file, name, *args):
    out = tmp_path / f"{name}.wav"
    r = run_here("generate", "--model", "tiny-random", "--seconds", "0.4", "--bank", bank_file, "--steer", "notes:C=2",
                 "--gate", "0.5", "--out", out, "--quiet", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(out.with_suffix(".json").read_text())


def test_the_gate_seed_follows_the_seed_unless_given(tmp_path, bank_file):
    from musicrfm.engine.generation import default_gate_seed
    from musicrfm.engine.steering import gate_open

    one, two = (_gate_run(tmp_path, bank_file, f"seed{s}", "--seed", str(s)) for s in (1, 2))
    seeds = [one["steering"]["gate_seed"], two["steering"]["gate_seed"]]
    assert seeds == [default_gate_seed(1), default_gate_seed(2)]  # the sidecar records the value used
    assert seeds[0] not in (1, seeds[1])  # derived, not the seed itself, and one per seed
    patterns = [[gate_open(s, step, 0.5) for step in range(200)] for s in seeds]
    assert patterns[0] != patterns[1]  # two seeds, two on/off patterns at the same p
    explicit = _gate_run(tmp_path, bank_file, "explicit", "--seed", "1", "--gate-seed", "5")
    assert explicit["steering"]["gate_seed"] == 5  # an explicit --gate-seed wins
    # The recorded value reproduces the run.
    r = run_here("generate", "--from-sidecar", tmp_path / "seed1.json", "--out", tmp_path / "again.wav", "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 0 and "tokens match the sidecar" in r.stdout, r.stdout + r.stderr


def test_from_sidecar_says_whether_the_tokens_match(tmp_path, bank_file):
    side = _gate_run(tmp_path, bank_file, "take", "--seed", "3")
    r = run_here("generate", "--from-sidecar", tmp_path / "take.json", "--out", tmp_path / "again.wav", "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"tokens match the sidecar (sha256 {side['tokens_sha256'][:16]}" in r.stdout
    # A sidecar whose tokens this run cannot give (as another device or dtype would): said, exit 1, no file.
    (tmp_path / "other.json").write_text(json.dumps({**side, "tokens_sha256": "0" * 64}))
    r = run_here("generate", "--from-sidecar", tmp_path / "other.json", "--out", tmp_path / "differs.wav", "--quiet",
                 cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "tokens differ" in r.stderr and "0000000000000000" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "differs.wav").exists() and not (tmp_path / "differs.json").exists()


def test_generate_at_the_attention_site_with_the_chosen_layer(tmp_path, bank_file):
    """The linear-probe method from the command line: an attention-site bank with a chosen layer, `--site attention
    --rule norm --layers chosen` steers that layer alone (explicit one-hot weights in the sidecar); the bank at
    the wrong site, or --layers chosen with a bank that chose none, is one clear line before anything loads."""
    bank = DirectionBank.load(bank_file)
    attention = DirectionBank.from_arrays(
        "notes", list(bank.concepts["notes"]), torch.stack([bank[f"notes:{c}"].vectors for c in bank.concepts["notes"]]),
        torch.stack([bank[f"notes:{c}"].scores for c in bank.concepts["notes"]]), bank.fingerprint, method="linear",
        pooling="mean", injection_point="attention", metadata={"layer_choice": {"method": "clustering", "layer": 1}})
    path = tmp_path / "notes.attention.safetensors"
    attention.save(path)
    out = tmp_path / "a.wav"
    common = ("generate", "--model", "tiny-random", "--seconds", "0.2", "--bank", path, "--steer", "notes:C=1",
              "--quiet")
    r = run_here(*common, "--out", out, "--site", "attention", "--rule", "norm", "--units", "raw", "--layers", "chosen",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    steering = json.loads(out.with_suffix(".json").read_text())["steering"]
    weights = [0.0] * bank.fingerprint.num_layers
    weights[1] = 1.0
    assert steering["layers"] == {"mode": "explicit", "weights": weights, "w0": 1.0}
    assert steering["site"] == "attention" and steering["rule"] == "norm"
    # The norm rule's alpha is already relative to each token's norm: in relative units s is alpha, the same tokens.
    r = run_here(*common, "--out", tmp_path / "r.wav", "--site", "attention", "--rule", "norm", "--layers", "chosen",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    relative = json.loads((tmp_path / "r.json").read_text())
    assert relative["tokens_sha256"] == json.loads(out.with_suffix(".json").read_text())["tokens_sha256"]
    r = run_here(*common, "--out", tmp_path / "b.wav", "--units", "raw", cwd=tmp_path)
    assert r.returncode == 2
    assert "read at the 'attention' injection point, but steering is set to site 'residual'" in r.stderr
    r = run_here("generate", "--model", "tiny-random", "--seconds", "0.2", "--bank", bank_file, "--steer", "notes:C=1",
                 "--layers", "chosen", "--out", tmp_path / "c.wav", "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and "records no chosen layer" in r.stderr
