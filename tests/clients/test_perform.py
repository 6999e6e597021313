"""Scores: parsing, offline rendering, and the same tokens when played on a live server."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_here

from musicrfm.protocol.score import ScoreError, load_score, parse_score

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "scores" / "example.toml"
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def test_the_example_score_parses():
    score = load_score(EXAMPLE)
    assert score.frames == 600 and score.seed == 7 and score.prompt == "piano note, middle register"
    assert score.directions() == {"notes:C", "notes:G"}
    steps = [c.step for c in score.cues]
    assert steps == sorted(steps) and steps[0] == 0 and 450 in steps
    assert score.banks == [] and score.model is None  # the bundled musicgen-mini and its banks


def test_the_example_score_plays_out_of_the_box(tmp_path):
    """By its bundled name, from a directory that holds nothing: as docs/scores.md and the README run it."""
    r = run_here("perform", "example", "--out", tmp_path / "perf.wav", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    perf = json.loads((tmp_path / "perf.json").read_text())
    assert perf["mode"] == "offline" and perf["frames"] == 600
    assert "noise" not in r.stdout + r.stderr


def test_cues_compile_to_set_messages():
    score = parse_score({
        "seconds": 4, "seed": 3, "prompt": "p", "steering": {"gate": 0.3, "layers": "topk:k=2"},
        "cue": [
            {"at": 1.0, "ramp": {"direction": "notes:C", "to": 0.8, "seconds": 0.5}},
            {"step": 0, "direction": {"key": "notes:C", "coefficient": 0.4, "schedule": "sine:period=100"}},
            {"at": 2.0, "crossfade": {"from": "notes:C", "to": "notes:G", "steps": 25}, "gate": 1.0},
            {"at": 3.0, "remove": "notes:G", "prompt": "q", "sampling": {"temperature": 0.9}},
        ]})
    first, *cues = score.messages()
    assert first == {"type": "set", "prompt": "p", "seed": 3, "gate": {"p": 0.3}, "layers": "topk:k=2"}
    assert [c["at_step"] for c in cues] == [0, 50, 100, 150]
    assert cues[0]["directions"] == {"notes:C": {"coefficient": 0.4, "schedule": "sine:period=100"}}
    # A ramp starts from the strength the earlier cue set (0.4) and ends at 0.8, 25 steps later.
    ramp = cues[1]["directions"]["notes:C"]
    points = ramp["schedule"]["points"]
    assert ramp["coefficient"] == 0.8 and points == [[0, 0.5], [25, 1.0]]
    fade = cues[2]["directions"]
    assert fade["notes:C"]["schedule"]["kind"] == "fade_out" and fade["notes:G"]["schedule"]["kind"] == "fade_in"
    assert fade["notes:C"]["coefficient"] == 0.8 and cues[2]["gate"] == {"p": 1.0}
    assert cues[3]["directions"] == {"notes:G": None} and cues[3]["prompt"] == "q"


@pytest.mark.parametrize("data, message", [
    ({}, "needs seconds"),
    ({"seconds": 2, "cue": [{"prompt": "x"}]}, "cue 1: needs exactly one of at"),
    ({"seconds": 2, "cue": [{"at": 1}]}, "cue 1: does nothing"),
    ({"seconds": 2, "cue": [{"at": 9, "prompt": "x"}]}, "after the end"),
    ({"seconds": 2, "cue": [{"at": 1, "ramp": {"direction": "notes:C", "to": 1}}]}, "exactly one of seconds"),
    ({"seconds": 2, "cue": [{"at": 1, "crossfade": {"from": "a:b", "to": "a:b", "steps": 3}}]}, "two different"),
    ({"seconds": 2, "cue": [{"at": 1, "wobble": 3}]}, "unknown key 'wobble'"),
    ({"seconds": 2, "tempo": 3}, "unknown key 'tempo'"),
    ({"seconds": float("nan")}, "must be finite"),
])
def test_bad_scores_name_the_cue_and_the_problem(data, message):
    with pytest.raises(ScoreError, match=message):
        parse_score(data)


def test_not_toml_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seconds = [")
    with pytest.raises(ScoreError, match="not valid TOML"):
        load_score(bad)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "musicrfm", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def strong_score(tmp_path, test_bank_path):
    """The example score with the test bank and coefficients strong enough to change tiny-random's tokens,
    so a cue applied at the wrong step would show up in the tokens."""
    text = EXAMPLE.read_text()
    text = text.replace("seconds = 12", "seconds = 4\nmodel = \"tiny-random\"\nbanks = [\"notes.safetensors\"]")
    text = re.sub(r'(key = "notes:C", coefficient = )[\d.]+', r"\g<1>40", text)
    text = re.sub(r"(to = )[\d.]+", r"\g<1>80", text)
    text = re.sub(r'(to = "notes:G", coefficient = )[\d.]+', r"\g<1>60", text)
    assert text.count("= 40") == text.count("= 60") == text.count("= 80") == 1
    text = text.replace("at = 5.0", "at = 1.5").replace("at = 6.0", "at = 2.5").replace("at = 9.0", "at = 3.5")
    shutil.copy(test_bank_path, tmp_path / "notes.safetensors")
    path = tmp_path / "score.toml"
    path.write_text(text)
    return path


def test_offline_and_live_performances_give_the_same_tokens(strong_score, tmp_path, live_server):
    # The offline steps run in this process (their process boundary is not what this test is about); the live
    # client is a process of its own, as a performer's would be.
    off = run_here("perform", strong_score, "--out", tmp_path / "off.wav", "--quiet", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    offline = json.loads((tmp_path / "off.json").read_text())
    assert offline["mode"] == "offline" and offline["frames"] == 200

    live = cli("perform", strong_score, "--url", f"{live_server.host}:{live_server.port}", "--out",
               tmp_path / "live.wav", "--compare", tmp_path / "off.json", cwd=tmp_path)
    assert live.returncode == 0, live.stderr + live.stdout
    assert f"tokens match {tmp_path / 'off.json'}" in live.stdout  # the comparison, said in one line
    online = json.loads((tmp_path / "live.json").read_text())
    assert online["mode"] == "live" and online["recording"]["frames"] == [0, 200]
    assert online["tokens_sha256"] == offline["tokens_sha256"]
    assert "noise" in live.stdout  # the random model's audio is never passed off as music

    # The server's recording replays to the same tokens.
    replay = run_here("replay", online["recording"]["log"], "--out", tmp_path / "replay.wav", "--quiet", cwd=tmp_path)
    assert replay.returncode == 0 and "tokens match" in replay.stdout, replay.stdout + replay.stderr

    # And a score without the strong cues gives other tokens: the comparison above can fail.
    weak = strong_score.read_text().replace("coefficient = 40", "coefficient = 0")
    (tmp_path / "weak.toml").write_text(weak)
    other = run_here("perform", tmp_path / "weak.toml", "--out", tmp_path / "weak.wav", "--compare",
                     tmp_path / "off.json", "--quiet", cwd=tmp_path)
    assert json.loads((tmp_path / "weak.json").read_text())["tokens_sha256"] != offline["tokens_sha256"], other.stderr
    assert other.returncode == 1 and "tokens differ" in other.stderr, other.stdout + other.stderr


def test_live_performance_with_a_direction_the_server_lacks_fails_clearly(tmp_path, live_server):
    path = tmp_path / "s.toml"
    path.write_text('seconds = 1\n[[cue]]\nat = 0\ndirection = { key = "chords:major", coefficient = 1 }\n')
    r = cli("perform", path, "--url", f"{live_server.host}:{live_server.port}", cwd=tmp_path)
    assert r.returncode == 2 and "lack chords:major" in r.stderr and "Traceback" not in r.stderr


def test_the_docs_perform_commands_work_from_any_directory(tmp_path, monkeypatch):
    """Every `musicrfm perform SCORE` in the README and docs/scores.md names a score that resolves from an empty
    directory (a bundled name), and none needs a bank a fresh machine lacks."""
    from musicrfm.perform import resolve_score

    root = EXAMPLE.parents[2]
    lines = [line for doc in ("README.md", "docs/scores.md") for line in (root / doc).read_text().splitlines()
             if "musicrfm perform " in line]
    assert lines
    monkeypatch.chdir(tmp_path)
    for line in lines:
        score = re.search(r"musicrfm perform ([\w./-]+)", line).group(1)
        assert resolve_score(Path(score)).is_file(), line
        assert "--bank" not in line, line
