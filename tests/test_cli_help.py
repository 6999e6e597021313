"""`musicrfm ... --help` as a user reads it: every default shown, every command described, `--bank` taken the
same way everywhere; and `--quiet` quiet down to transformers' own loading bars."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from musicrfm.main import build_parser

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "musicrfm", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def help_text(tmp_path: Path, *command: str) -> str:
    r = cli(*command, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())  # one line: wrapping depends on the terminal


def commands(parser: argparse.ArgumentParser, name: str = "musicrfm"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from commands(p, f"{name} {sub}")


def shown_default(action: argparse.Action) -> bool:
    d = action.default
    return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d))


def test_every_option_of_every_command_shows_its_default():
    """Walks the real parser: an option with a default has help text that states it."""
    missing = []
    for name, parser in commands(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, SKIP) or not shown_default(action):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


@pytest.mark.parametrize("command, expected", [
    (("generate",), ["--seconds SECONDS", "(default: 10.0)", "(default: out.wav)", "Bernoulli gate probability per "
                     "step (paper's best: 0.3) (default: 1.0)", "classifier-free guidance scale (1 = off) (default: "
                     "3.0)", "(default: 250)", "sampling seed (default: 0)", "5.12 s for musicgen-mini",
                     "(default: derived from --seed"]),
    (("serve",), ["(0: any free port) (default: 8765)", "ahead of playback (default: 0.5)",
                  "(default: recordings)", "(default: 8)", "(default: 1.0 relative", "(default: musicgen-mini)"]),
    (("train",), ["(default: features)", "(default: notes)", "(default: banks)", "(default: rfm)", "(default: mean)",
                  "split and search seed (default: 0)", "(default: cuda if present)"]),
    (("report",), ["(default: features)", "(default: reports)", "split and search seed (default: 0)"]),
    (("replay",), ["Regenerate a recording made by `musicrfm serve`", "(default: LOG-replay.wav"]),
    (("eval", "sweep"), ["(default: 8)", "(default: 10.0)", "(default: 3.0)"]),
])
def test_help_states_the_defaults(tmp_path, command, expected):
    text = help_text(tmp_path, *command)
    for needle in expected:
        assert needle in text, (needle, text)


@pytest.mark.parametrize("command", [("generate",), ("serve",), ("perform", "score.toml"), ("eval", "sweep")])
def test_bank_is_repeatable_the_same_way_everywhere(command):
    extra = ["--preset", "eta", "--out", "o"] if command[0] == "eval" else []
    args = build_parser().parse_args([*command, "--bank", "a.safetensors", "--bank", "b.safetensors", *extra])
    assert args.bank == [Path("a.safetensors"), Path("b.safetensors")]
    with pytest.raises(SystemExit):  # one file per --bank, everywhere
        build_parser().parse_args([*command, "--bank", "a.safetensors", "b.safetensors", "c.safetensors",
                                   *extra])


def test_quiet_silences_the_model_loading_bars_too(tmp_path):
    loud = cli("generate", "--seconds", "0.1", "--out", tmp_path / "loud.wav", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # what --quiet must hide: transformers' bar, not only ours
    quiet = cli("generate", "--seconds", "0.1", "--out", tmp_path / "quiet.wav", "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert not re.search(r"Loading|it/s|%\|", quiet.stderr), quiet.stderr
