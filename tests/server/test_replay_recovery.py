"""`musicrfm replay` run as a user runs it (a subprocess) on real recordings: a long log (thousands of control
changes, written by the server's own Recorder), one cut off by SIGKILL from a live `musicrfm serve`, and
copies of them damaged the ways a crash or an editor damages files (docs/protocol.md, "Recordings")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from musicrfm.engine.generation import load_banks
from musicrfm.protocol.wav import read_wav, write_wav
from musicrfm.server.recording import Recorder, read_log
from musicrfm.server.stream import MAX_FUTURE_CHANGES, MAX_OUT_OF_ORDER_CHANGES, Cause, Stream

from live_client import LiveClient
from live_server import start_server

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one intra-op thread: see conftest.py
CHANGES = 2100  # far more than a live client may queue (MAX_OUT_OF_ORDER_CHANGES), in order in the log


def replay_cli(log: Path, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musicrfm", "replay", str(log), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=timeout)


def copy_recording(log: Path, to: Path) -> Path:
    """The log and its WAV under a new name (replay finds the WAV beside the log)."""
    to.mkdir(parents=True, exist_ok=True)
    shutil.copy(log, to / "rec.jsonl")
    shutil.copy(log.with_suffix(".wav"), to / "rec.wav")
    return to / "rec.jsonl"


@pytest.fixture(scope="module")
def long_recording(tiny, test_bank_path, tmp_path_factory) -> Path:
    """A stream played with the server's Stream and recorded by its Recorder, as a session does, with
    CHANGES control changes, several per step up to the recording's very end."""
    assert CHANGES > MAX_OUT_OF_ORDER_CHANGES and CHANGES * 2 > MAX_FUTURE_CHANGES
    stream = Stream(tiny, load_banks([test_bank_path]))
    cause = Cause("websocket", 1)
    stream.submit({"type": "transport", "command": "play"}, cause)
    stream.apply_due()
    recorder = Recorder(tmp_path_factory.mktemp("long") / "long", stream, [test_bank_path])
    sent = 0
    while sent < CHANGES:
        for _ in range(6):
            stream.submit({"type": "set", "directions": {"notes:C": {"coefficient": (sent % 97) / 50}},
                           "gate": {"p": 0.5 + (sent % 5) / 10}}, cause)
            sent += 1
        chunk = stream.generate(1)
        for applied in chunk.applied:
            recorder.add_state(applied)
        recorder.add_audio(chunk.first_sample, chunk.audio)
    recorder.finish(stream.generator.codes())
    return recorder.log_path


@pytest.fixture(scope="module")
def killed_recording(test_bank_path, tmp_path_factory) -> Path:
    """A live server's recording (with a change in the middle) when the server is killed with SIGKILL."""
    server = start_server(test_bank_path, tmp_path_factory.mktemp("killed"))
    try:
        with LiveClient(server.ws_url("t-kill")) as c:
            assert c.request({"type": "transport", "command": "play", "id": "p"})["type"] == "state"
            c.wait_audio(3)
            mark = c.mark()
            c.send({"type": "record", "command": "start"})
            started = c.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
            c.wait_audio(15, since=c.audio_mark())
            assert c.request({"type": "set", "id": "s", "directions": {"notes:C": {"coefficient": 0.9}}})["type"] == "state"
            c.wait_audio(15, since=c.audio_mark())
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = Path(started["log"])
    header, states, end = read_log(log)
    assert end is None and len(states) >= 2  # cut off: no end line, the change is in
    return log


# --- item 2: a log of any length ------------------------------------------------------------------------


def test_a_recording_with_thousands_of_changes_replays_to_its_tokens(long_recording, tmp_path):
    header, states, end = read_log(long_recording)
    assert len(states) > CHANGES and end is not None
    out = tmp_path / "again.wav"
    result = replay_cli(long_recording, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens match" in result.stdout and "audio matches" in result.stdout, result.stdout
    recorded, _ = read_wav(long_recording.with_suffix(".wav"))
    again, _ = read_wav(out)
    assert again.shape == recorded.shape


def test_a_replay_whose_tokens_differ_exits_non_zero_and_writes_nothing(long_recording, tmp_path):
    log = copy_recording(long_recording, tmp_path / "tampered")
    lines = log.read_text().splitlines()
    end = json.loads(lines[-1])
    end["tokens_sha256"] = "0" * 64
    log.write_text("\n".join([*lines[:-1], json.dumps(end)]) + "\n")
    out = tmp_path / "again.wav"
    result = replay_cli(log, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tokens differ" in result.stderr and f"not writing {out}" in result.stderr, result.stderr
    assert not out.exists()


def test_a_log_whose_last_line_was_cut_mid_write_replays_up_to_it(long_recording, tmp_path):
    log = copy_recording(long_recording, tmp_path / "cut")
    data = log.read_bytes()
    log.write_bytes(data[:len(data) - 40])  # half of the end line: a crash while writing it
    out = tmp_path / "again.wav"
    result = replay_cli(log, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "last line was cut off" in result.stdout and "cut off (no end line)" in result.stdout, result.stdout
    assert "audio matches the recorded WAV" in result.stdout, result.stdout
    assert out.exists()


# --- item 8: crash recovery ---------------------------------------------------------------------------


def test_a_recording_killed_mid_stream_replays_what_was_recorded(killed_recording, tmp_path):
    recorded, rate = read_wav(killed_recording.with_suffix(".wav"))
    header, states, _ = read_log(killed_recording)
    frames = recorded.shape[0] // header["hop"]
    out = tmp_path / "again.wav"
    result = replay_cli(killed_recording, out)
    assert result.returncode == 0, result.stdout + result.stderr
    first = header["first_frame"]
    # How far the recording got, all of it regenerated (not up to the last change plus a second), and checked.
    assert f"cut off (no end line): frames {first}..{first + frames}" in result.stdout, result.stdout
    assert "audio matches the recorded WAV" in result.stdout, result.stdout
    again, _ = read_wav(out)
    assert again.shape[0] == frames * header["hop"]


def test_a_tampered_wav_makes_replay_fail_and_write_nothing(killed_recording, tmp_path):
    log = copy_recording(killed_recording, tmp_path / "wav")
    audio, rate = read_wav(log.with_suffix(".wav"))
    audio[audio.shape[0] // 2:audio.shape[0] // 2 + 2000] += 0.25
    write_wav(log.with_suffix(".wav"), np.clip(audio, -1, 1), rate)
    out = tmp_path / "again.wav"
    result = replay_cli(log, out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the recorded WAV differs" in result.stderr and "not writing" in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.parametrize("step, message", [
    (1e11, "step must be a whole number"),
    (10**11, "is past the recording"),
    ("7", "step must be a whole number"),
])
def test_an_absurd_step_is_refused_at_once(killed_recording, tmp_path, step, message):
    log = copy_recording(killed_recording, tmp_path / "step")
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    last["step"] = step
    log.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    result = replay_cli(log, tmp_path / "again.wav", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("musicrfm: error: ") and message in err[0], result.stderr
    assert str(log) in err[0] and f"line {len(lines)}" in err[0]
    assert not (tmp_path / "again.wav").exists()
