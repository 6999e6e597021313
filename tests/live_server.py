"""The live-server harness: `musicrfm serve` in a subprocess on free ports, as a user starts it. Tests of
the public protocol speak to it over real sockets."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class LiveServer:
    process: subprocess.Popen
    host: str
    port: int
    osc_port: int
    record_dir: Path
    bank_path: Path
    output: list[str] = field(default_factory=list)  # the server's stdout+stderr lines so far

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def ws_url(self, session: str = "main", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"session": session, **params}.items())
        return f"ws://{self.host}:{self.port}/ws?{query}"


def start_server(bank_path: Path | None, record_dir: Path, *extra: str, timeout: float = 120,
                 model: str | None = "tiny-random") -> LiveServer:
    """`musicrfm serve` on free ports; bank_path / model None: the server's defaults (musicgen-mini and
    its bundled banks)."""
    cmd = [sys.executable, "-m", "musicrfm", "serve", *(["--model", model] if model else []),
           *(["--bank", str(bank_path)] if bank_path else []),
           "--port", "0", "--osc-port", "0", "--record-dir", str(record_dir), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # keep reading so the pipe never fills; tests can look at what the server said
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("musicrfm serve did not start:\n" + "\n".join(lines))
    text = "\n".join(lines)
    page = re.search(r"page: http://([\d.]+):(\d+)/", text)
    osc = re.search(r"osc: udp [\d.]+:(\d+)", text)
    return LiveServer(proc, page.group(1), int(page.group(2)), int(osc.group(1)), record_dir, bank_path, lines)


def stop_server(server: LiveServer) -> int:
    """SIGINT, as Ctrl-C does: the server must shut down cleanly."""
    server.process.send_signal(signal.SIGINT)
    try:
        return server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise


def said(server: LiveServer, text: str, timeout: float = 60.0) -> str | None:
    """The first line of the server's output that holds `text`, waiting up to `timeout` s; None if none."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(server.output):
            if text in line:
                return line
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def wait_for_output(server: LiveServer, text: str, timeout: float = 60.0) -> str:
    """Like `said`, but a line that never comes fails the test, showing what the server did say."""
    line = said(server, text, timeout)
    if line is None:
        raise AssertionError(f"the server never said {text!r}:\n" + "\n".join(server.output[-30:]))
    return line


@pytest.fixture(scope="module")
def live_server(request, tmp_path_factory, test_bank_path):
    """`musicrfm serve --model tiny-random` in a subprocess on free ports (one per test module). A module
    that needs other flags (room for more sessions, ...) sets `SERVER_ARGS = (...)`."""
    extra = getattr(request.module, "SERVER_ARGS", ())
    server = start_server(test_bank_path, tmp_path_factory.mktemp("recordings"), *extra)
    yield server
    code = stop_server(server)
    assert code == 0, "the server did not shut down cleanly:\n" + "\n".join(server.output)


def http_get(port: int, path: str, headers: dict | None = None, timeout: float = 10.0) -> http.client.HTTPResponse:
    """One plain HTTP GET to the server on loopback; the response with its whole `body` read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response
