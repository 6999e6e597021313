"""The `musicrfm` command line: one entry point above every package.

Each package owns its subcommands and adds them through a `register(subparsers)` function in its `cli`
module; this module only gathers them, in the order `musicrfm --help` lists them. Heavy imports (torch,
transformers) wait until a command runs, so client commands start without them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from musicrfm import __version__, perform
from musicrfm.clients import cli as clients_cli
from musicrfm.engine import cli as engine_cli
from musicrfm.evaluation import cli as evaluation_cli
from musicrfm.mini import cli as mini_cli
from musicrfm.probes import cli as probes_cli
from musicrfm.server import cli as server_cli

# engine: generate; probes: data, extract, train, report; evaluation: eval; mini: mini; server: serve,
# replay; clients: listen; the root: perform (offline = the server's Stream, live = a client: musicrfm.perform).
REGISTRARS = (engine_cli.register, probes_cli.register, evaluation_cli.register, mini_cli.register,
              server_cli.register, clients_cli.register, perform.register)

# What a command raises for bad settings, missing files or weights, bad banks: one clear line, no traceback.
# Every package's own errors derive from one of these (BankError's kinds, ProtocolError, ScoreError,
# ModelLoadError, ...; tests/test_cli_root.py checks), so this module needs to import none of them.
EXPECTED_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every option's default, "(default: X)", unless its help already says it or there is
    nothing to show (no value, an off flag, an empty list of a repeatable option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, list) and not default) or "%(default)" in text or "(default" in text):
            return text
        if default == "":
            return f"{text} (default: empty)"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of `musicrfm` and of every subcommand (add_subparsers hands its class down), so all of
    them format help the same way."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="musicrfm", description="Steer MusicGen with concept directions.")
    parser.add_argument("--version", action="version", version=f"musicrfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def quiet_transformers() -> None:
    """`--quiet`: no loading bars or log lines from transformers and the hub either. Through the environment,
    read when they are imported (commands that never load a model import neither), and directly when
    they already are (main called in a process that imported them)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # MusicGen configs trip harmless pad-token warnings. Set through the environment, so commands that never
    # touch a model (listen, perform --url) start without importing transformers and torch.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_transformers()
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"musicrfm: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
