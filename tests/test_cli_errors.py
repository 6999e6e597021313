"""Bad files given to the command line, run as a user runs it (`python -m musicrfm ...` in a subprocess):
each gets one line, `musicrfm: error: ...`, naming the file and the problem, exit code 2, no traceback,
and (where the file says it all) before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musicrfm.engine.generation import load_banks
from musicrfm.server.recording import Recorder
from musicrfm.server.stream import Cause, Stream

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musicrfm", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("musicrfm: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- perform: scores ---------------------------------------------------------------------------------------

SCORES = {
    "huge-seconds": ('model = "tiny-random"\nseconds = 1e308\n', "seconds must be > 0 and at most"),
    "remove-list": ('model = "tiny-random"\nseconds = 1\n[[cue]]\nat = 0.5\nremove = [[1]]\n', "remove names directions"),
    "directions-list": ('model = "tiny-random"\nseconds = 1\n[[cue]]\nat = 0.5\nset.directions = [1, 2]\n',
                        "set.directions must be a table"),
    "model-number": ("model = 5\nseconds = 1\n", "model must be a model name"),
    "deep-nesting": ("seconds = 1\nx = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "unknown-direction": ('model = "tiny-random"\nseconds = 1\n[[cue]]\nat = 0.5\ndirection = { key = "notes:Q", '
                          'coefficient = 1.0 }\n', "the cue at step 25"),
}


@pytest.mark.parametrize("name", list(SCORES))
def test_perform_names_the_score_and_its_problem(tmp_path, name):
    text, message = SCORES[name]
    score = tmp_path / f"{name}.toml"
    score.write_text(text)
    result = cli("perform", score, "--out", tmp_path / "out.wav", "--quiet", cwd=tmp_path)
    assert_one_line_error(result, str(score), message)
    assert not (tmp_path / "out.wav").exists()


# --- generate --from-sidecar, --seconds -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory) -> dict:
    """A real sidecar, written by `musicrfm generate`."""
    folder = tmp_path_factory.mktemp("sidecar")
    result = cli("generate", "--model", "tiny-random", "--seconds", "0.2", "--out", folder / "g.wav", "--quiet",
                 cwd=folder)
    assert result.returncode == 0, result.stderr
    return json.loads((folder / "g.json").read_text())


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


SIDECARS = {
    "top-level-list": (lambda s: [s], "a render sidecar is a JSON object"),
    "banks-string": (lambda s: {**s, "banks": "abc"}, "banks must be a list"),
    "chunk-steps-string": (lambda s: {**s, "chunk_steps": "5"}, "chunk_steps must be a whole number"),
    "unknown-sampling-key": (lambda s: {**s, "sampling": {**s["sampling"], "bogus": 1}}, "unknown field 'bogus'"),
    "prompt-object": (lambda s: {**s, "prompt": {}}, "prompt must be a string"),
    "huge-seconds": (lambda s: {**s, "seconds": 1e308}, "seconds must be > 0 and at most"),
    "missing-model": (lambda s: _without(s, "model"), "the sidecar lacks 'model'"),
    "bad-steering": (lambda s: {**s, "steering": {**s["steering"], "rows": 3}}, "rows"),
}


@pytest.mark.parametrize("name", list(SIDECARS))
def test_generate_from_sidecar_names_the_file_and_its_problem(tmp_path, sidecar, name):
    make, message = SIDECARS[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(make(sidecar)))
    result = cli("generate", "--from-sidecar", path, "--out", tmp_path / "out.wav", "--quiet", cwd=tmp_path)
    assert_one_line_error(result, str(path), message)


def test_generate_from_a_deeply_nested_sidecar_names_it(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    result = cli("generate", "--from-sidecar", path, "--out", tmp_path / "out.wav", "--quiet", cwd=tmp_path)
    assert_one_line_error(result, str(path), "nested too deeply")


def test_generate_refuses_absurd_seconds(tmp_path):
    result = cli("generate", "--model", "tiny-random", "--seconds", "1e308", "--out", tmp_path / "out.wav",
                 "--quiet", cwd=tmp_path)
    assert_one_line_error(result, "--seconds must be > 0 and at most")
    assert "model:" not in result.stderr  # refused before the model was loaded


# --- replay: logs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_lines(tiny, test_bank_path, tmp_path_factory) -> list[dict]:
    """A real recording's log (the server's Stream and Recorder), as parsed lines."""
    stream = Stream(tiny, load_banks([test_bank_path]))
    cause = Cause("websocket", 1)
    stream.submit({"type": "transport", "command": "play"}, cause)
    stream.apply_due()
    recorder = Recorder(tmp_path_factory.mktemp("log") / "rec", stream, [test_bank_path])
    stream.submit({"type": "set", "directions": {"notes:C": {"coefficient": 0.5}}, "at_step": 5}, cause)
    for _ in range(20):
        chunk = stream.generate(1)
        for applied in chunk.applied:
            recorder.add_state(applied)
        recorder.add_audio(chunk.first_sample, chunk.audio)
    recorder.finish(stream.generator.codes())
    return [json.loads(line) for line in recorder.log_path.read_text().splitlines()]


def _header(lines: list[dict], **changes) -> list:
    return [{**lines[0], **changes}, *lines[1:]]


LOGS = {
    "state-line-a-list": (lambda ls: [ls[0], [1, 2], *ls[1:]], "line 2: a log line must be a JSON object"),
    "state-a-list": (lambda ls: [ls[0], {**ls[1], "state": [1]}, *ls[2:]], "line 2: a state line's state must be"),
    "first-frame-string": (lambda ls: _header(ls, first_frame="x"), "first_frame must be a whole number"),
    "missing-model": (lambda ls: [_without(ls[0], "model"), *ls[1:]], "the header (line 1) lacks 'model'"),
    "bad-coefficient": (lambda ls: [ls[0], {**ls[1], "state": {**ls[1]["state"], "directions": {
        "notes:C": {"coefficient": "x"}}}}, *ls[2:]], "line 2"),
    "steps-backwards": (lambda ls: [*ls[:-1], {**ls[-2], "step": 0}, ls[-1]] if ls[-2]["step"] else None,
                        "comes before the previous line's"),
    "end-frames-absurd": (lambda ls: [*ls[:-1], {**ls[-1], "frames": [ls[-1]["frames"][0], 10**12]}],
                          "frames cannot fit in"),
}


@pytest.mark.parametrize("name", list(LOGS))
def test_replay_names_the_log_and_its_problem(tmp_path, log_lines, name):
    make, message = LOGS[name]
    lines = make(log_lines)
    assert lines is not None
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = cli("replay", path, "--out", tmp_path / "out.wav", "--quiet", cwd=tmp_path)
    assert_one_line_error(result, str(path), message)
    assert not (tmp_path / "out.wav").exists()


# --- mistakes every command sees before a model loads --------------------------------------------------------


@pytest.mark.parametrize("out, message", [
    ("/proc/x.wav", "--out /proc/x.wav: cannot write in /proc"),
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/perf.wav", "does not exist (create it first)"),
])
def test_perform_refuses_an_out_it_cannot_write_before_playing(tmp_path, out, message):
    out = out.replace("{tmp}", str(tmp_path))
    result = cli("perform", "example", "--out", out, "--quiet", cwd=tmp_path)
    assert_one_line_error(result, message)
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing left behind
    # Live too: refused before the server is asked to play (there is no server on this port at all).
    result = cli("perform", "example", "--url", "127.0.0.1:9", "--out", out, cwd=tmp_path)
    assert_one_line_error(result, message)


def test_perform_and_serve_refuse_an_unknown_model_at_once(tmp_path):
    assert_one_line_error(cli("perform", "example", "--model", "musicgen-mni", "--out", tmp_path / "p.wav",
                              cwd=tmp_path), "did you mean musicgen-mini")
    assert_one_line_error(cli("serve", "--model", "musicgen-mni", "--port", "0", "--osc-port", "-1",
                              cwd=tmp_path), "did you mean musicgen-mini")
    (tmp_path / "recordings").write_text("a file where the folder goes")
    assert_one_line_error(cli("serve", "--model", "tiny-random", "--port", "0", "--osc-port", "-1",
                              "--record-dir", tmp_path / "recordings", cwd=tmp_path), "is a file, not a directory")


def test_eval_sweep_refuses_absurd_settings_before_the_model(tmp_path):
    for args, message in ((["--seconds", "1e308"], "--seconds must be > 0 and at most"),
                          (["--seconds", "nan"], "--seconds must be finite"),
                          (["--model", "musicgen-mni"], "did you mean musicgen-mini")):
        result = cli("eval", "sweep", "--preset", "eta", "--out", tmp_path / "sweep", *args, "--quiet", cwd=tmp_path)
        assert_one_line_error(result, message)
        assert not (tmp_path / "sweep").exists()


def test_listen_refuses_an_out_it_cannot_write_before_connecting(tmp_path):
    result = cli("listen", "127.0.0.1:9", "--no-audio", "--out", tmp_path / "no" / "rec.wav", cwd=tmp_path)
    assert_one_line_error(result, "does not exist (create it first)")


def test_replay_refuses_an_out_it_cannot_write_before_regenerating(tmp_path, log_lines):
    path = tmp_path / "rec.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in log_lines))
    result = cli("replay", path, "--out", "/proc/again.wav", "--quiet", cwd=tmp_path)
    assert_one_line_error(result, "--out /proc/again.wav: cannot write in /proc")
    assert "regenerated" not in result.stdout  # refused before the stream was run again
