"""`musicrfm ARGS` the two ways the tests run it: in a real subprocess (`run`: exit codes, stderr, a fresh Python),
or in this process (`run_here`: the same command line, exit code and output, without starting Python and torch
again; for steps whose process boundary is not what a test is about)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import types

CLI = [shutil.which("musicrfm")] if shutil.which("musicrfm") else [sys.executable, "-m", "musicrfm"]


def run(*args, cwd, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """A subprocess with one intra-op thread, offline, this interpreter's scripts first on PATH."""
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{sys.prefix}/bin:/usr/bin:/bin", **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_here(*args, cwd) -> types.SimpleNamespace:
    """`musicrfm ARGS` in this process, in `cwd`: returncode, stdout, stderr as `run` gives them."""
    from musicrfm.main import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
