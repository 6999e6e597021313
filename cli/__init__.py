"""musicrfm: live steering of MusicGen with musical concept directions.

This folder is the root of the installed `musicrfm` package (pyproject maps it there); the others are
its subpackages, each a top-level folder of the repository (docs/architecture.md):

  musicrfm.protocol    the public protocol: wire messages, the score format, a client connection (torch-free)
  musicrfm.engine      the model, the decode loop, steering, direction banks, audio decoding
  musicrfm.probes      SynTheory audio -> per-layer features -> probes -> direction banks
  musicrfm.evaluation  judging steered audio: independent checks, FD / MMD, sweeps
  musicrfm.mini        training the bundled model, musicgen-mini
  musicrfm.server      live sessions: control state, streams, WebSocket + OSC, recordings
  musicrfm.clients     the browser page, the speaker client, score performances

`musicrfm.main` is the one `musicrfm` command line above them all.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("musicrfm")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
