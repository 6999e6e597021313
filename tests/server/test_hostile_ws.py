"""The WebSocket / HTTP transport under hostile input (issue 12): what one client sends, or fails to read,
never stops anybody's audio, never costs unbounded memory, and is never echoed back unbounded; a web page
from elsewhere (or a DNS-rebound name) cannot use the server. Everything here speaks to a real `musicrfm
serve` over real sockets, except one in-process test of the session's listener isolation."""

from __future__ import annotations

import asyncio
import json
import re
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from musicrfm.server.session import Session, SessionConfig
from musicrfm.server.stream import Cause, Stream

from live_server import http_get, said, start_server, stop_server
from live_client import LiveClient, RawClient


# The live_server fixture (tests/live_server.py) with room for the sessions these tests make.
SERVER_ARGS = ("--max-sessions", "16")


def client(server, session: str, encoding: str = "json", **kwargs) -> LiveClient:
    params = {"encoding": encoding} if encoding != "json" else {}
    return LiveClient(server.ws_url(session, **params), encoding=encoding, **kwargs)


def ws_refusal(url: str, **kwargs) -> int | None:
    """The HTTP status a WebSocket handshake is refused with (None: it was accepted)."""
    async def attempt():
        try:
            async with connect(url, open_timeout=10, **kwargs) as ws:
                await ws.recv()  # the hello
                return None
        except InvalidStatus as exc:
            return exc.response.status_code

    return asyncio.run(attempt())


def tracebacks(server, since: int) -> list[str]:
    return [line for line in server.output[since:] if "Traceback" in line or line.startswith("ERROR")]


# --- item 1: one listener's failure never reaches the session --------------------------------------------------


def test_an_id_beyond_64_bits_is_refused_and_every_listener_keeps_its_audio(live_server):
    """An integer id of 2**64 went into `cause.id`; encoding it for a msgpack listener raised inside the
    session loop and the session's audio stopped for good."""
    with client(live_server, "h-id", encoding="msgpack") as packed, client(live_server, "h-id") as plain:
        state = plain.request({"type": "transport", "command": "play", "id": "play"})
        assert state["state"]["playback"] == "playing"
        packed.wait_audio(3)
        for bad in (2 ** 64, 2 ** 63, -(2 ** 63) - 1, 10 ** 40):
            mark = plain.mark()
            plain.send(json.dumps({"type": "set", "id": bad, "gate": {"p": 0.5}}))
            error = plain.wait(lambda m: m["type"] in ("error", "state"), since=mark)
            assert error["type"] == "error" and "id must be" in error["message"] and error["id"] is None, error
        # The 64-bit extremes are ids like any other, echoed to the msgpack listener too.
        for good in (2 ** 63 - 1, -(2 ** 63)):
            state = plain.request({"type": "set", "id": good, "gate": {"p": 0.4}})
            assert state["type"] == "state" and state["cause"]["id"] == good
            packed.wait(lambda m, good=good: m["type"] == "state" and m["cause"]["id"] == good)
        # Both still hear the session, and it still plays.
        a, b = packed.audio_mark(), plain.audio_mark()
        packed.wait_audio(10, since=a)
        plain.wait_audio(10, since=b)
        assert packed.alive and plain.alive
        assert plain.get_state()["state"]["playback"] == "playing"
        plain.send({"type": "transport", "command": "stop"})


class FakeListener:
    def __init__(self, client_id: int, fails: str | None = None):
        self.client_id, self.fails = client_id, fails
        self.audio = 0
        self.messages: list[dict] = []
        self.dropped: str | None = None

    def send_audio(self, frame: bytes, samples: int) -> None:
        if self.fails == "audio":
            raise ConnectionError("the socket broke")
        self.audio += 1

    def send_message(self, message: dict) -> None:
        if self.fails == "message":
            raise OverflowError("Integer value out of range")
        self.messages.append(message)

    def drop(self, reason: str) -> None:
        self.dropped = reason


def test_a_listener_whose_send_raises_is_dropped_and_the_session_plays_on(tiny, tmp_path):
    async def main() -> tuple[FakeListener, ...]:
        session = Session("unit", Stream(tiny, None), SessionConfig(record_dir=tmp_path), [])
        session.start()
        good, bad_message, bad_audio = FakeListener(1), FakeListener(2, "message"), FakeListener(3, "audio")
        for listener in (good, bad_message, bad_audio):
            session.add_listener(listener)
        try:
            await session.handle({"type": "transport", "command": "play"}, Cause("websocket", 1, None))
            deadline = time.monotonic() + 60
            while good.audio < 20:
                assert time.monotonic() < deadline, f"the session stopped after {good.audio} chunks"
                await asyncio.sleep(0.05)
            assert session.listeners == 1
        finally:
            await session.close()
        return good, bad_message, bad_audio

    good, bad_message, bad_audio = asyncio.run(main())
    assert bad_message.dropped and "OverflowError" in bad_message.dropped
    assert bad_audio.dropped and "ConnectionError" in bad_audio.dropped
    assert any(m["type"] == "state" and m["state"]["playback"] == "playing" for m in good.messages)


# --- item 5: memory per client, rate-limit replies, echoes -----------------------------------------------------


def test_a_client_that_never_reads_on_a_stopped_session_is_dropped(live_server):
    """Nothing plays, so no audio backlog: before, the replies to its own messages queued without bound
    (and the pings behind them never got out, so it was never closed)."""
    raw = RawClient(live_server, "h-noread")
    left = f"client {raw.hello['client_id']} left session h-noread"
    try:
        raw.send_json({"type": "set", "prompt": "a slow drone " * 100})  # every `state` answer ~1.5 KB
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and said(live_server, left, 0) is None:
            try:
                raw.send_json({"type": "get"})  # 40 a second: within the rate limit, each one answered
            except OSError:  # the server cut the connection
                break
            time.sleep(0.025)
        assert said(live_server, left, 15) is not None, "\n".join(live_server.output[-20:])
    finally:
        raw.sock.close()
    # Nobody else noticed.
    with client(live_server, "h-noread") as c:
        assert c.get_state()["state"]["prompt"].startswith("a slow drone")


def test_messages_over_the_rate_limit_get_one_notice_not_one_error_each(live_server):
    async def flood(session: str, count: int) -> tuple[list[dict], int | None]:
        """Send `count` gets at once, read the replies; then, after a pause, one more get. Returns the replies
        and the close code if the server closed the connection."""
        replies: list[dict] = []
        async with connect(live_server.ws_url(session), max_size=None) as ws:
            await ws.recv()  # the hello
            try:
                for _ in range(count):
                    await ws.send('{"type": "get"}')
                try:
                    while True:
                        replies.append(json.loads(await asyncio.wait_for(ws.recv(), 3)))
                except asyncio.TimeoutError:
                    pass
                await asyncio.sleep(2.5)  # the bucket refills: the connection is still good
                await ws.send('{"type": "get", "id": "after"}')
                while True:
                    replies.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                    if replies[-1].get("id") == "after":
                        return replies, None
            except ConnectionClosed as exc:
                return replies, exc.rcvd.code if exc.rcvd else None

    # 1,000 past the burst: they are dropped, and said so once, with a count.
    replies, closed = asyncio.run(flood("h-rate", 1200))
    assert closed is None
    errors = [m for m in replies if m["type"] == "error"]
    states = [m for m in replies if m["type"] == "state"]
    assert 1 <= len(errors) <= 3, [e["message"] for e in errors][:5]
    assert all("rate limit" in e["message"] for e in errors) and "dropped" in errors[0]["message"]
    assert len(states) >= 150  # the burst's answers, and the one after the pause

    # Persistent abuse: far over the rate for long, and the connection is closed (policy violation).
    replies, closed = asyncio.run(flood("h-rate", 6000))
    assert closed == 1008
    assert len([m for m in replies if m["type"] == "error"]) <= 3


def test_long_input_is_never_echoed_in_full(live_server):
    with client(live_server, "h-echo") as c:
        for message in ({"type": "set", "k" * 60000: 1},
                        {"type": "set", "directions": {"k" * 60000: {"coefficient": 0.5}}},
                        {"type": "set", "gate": {"p": "k" * 60000}},
                        {"type": "k" * 60000},
                        {"type": "record", "command": "k" * 60000},
                        {"type": "transport", "command": "k" * 60000},
                        {"type": "transport", "command": "play", "k" * 60000: 1},
                        {"type": "transport", "command": "reset", "seed": "k" * 60000},
                        {"type": "set", "at_step": "k" * 60000, "prompt": "x"},
                        {"type": "set", "sampling": {"greedy": "k" * 60000}}):
            error = c.request({**message, "id": "long"})
            assert error["type"] == "error", error
            assert len(error["message"]) <= 500 and "kkkk" in error["message"], error["message"][:600]
            assert re.search(r"\(600\d\d characters\)", error["message"]), error["message"]  # how long it was
        assert c.alive


# --- item 9: a lone surrogate, long paths ----------------------------------------------------------------------


def test_a_lone_surrogate_in_an_error_reaches_a_msgpack_client(live_server):
    """JSON text can carry "\\ud800"; the error naming it could not be msgpack-encoded, and the connection
    died with 1011."""
    mark = len(live_server.output)
    with client(live_server, "h-surrogate", encoding="msgpack") as c:
        for text in ('{"type": "set", "id": "s1", "\\ud800": NaN}',
                     '{"type": "set", "id": "s2", "directions": {"\\ud800": {"coefficient": NaN}}}',
                     '{"type": "set", "id": "s3", "directions": {"\\ud800": {"coefficient": 1}}}'):
            m = c.mark()
            c.send(text)
            error = c.wait(lambda e: e["type"] == "error", since=m)
            assert "\\ud800" in error["message"], error
        assert c.get_state()["type"] == "state" and c.alive and c.closed is None
    assert tracebacks(live_server, mark) == []


def test_long_url_paths_are_not_found_not_a_server_error(live_server):
    mark = len(live_server.output)
    assert http_get(live_server.port, "/" + "a" * 300).status == 404
    assert http_get(live_server.port, "/" + "a" * 300 + ".js?x=1").status == 404
    assert http_get(live_server.port, "/" + "a" * 10000).status in (404, 414)
    assert http_get(live_server.port, "/").status == 200  # and it keeps serving
    time.sleep(0.5)
    assert tracebacks(live_server, mark) == []


# --- item 4: origins and hosts ---------------------------------------------------------------------------------


def test_pages_from_other_origins_and_rebound_names_are_refused(live_server):
    port = live_server.port
    url = live_server.ws_url("h-evil")
    # A page on evil.example cannot open a WebSocket (so cannot start a recording or change anything).
    assert ws_refusal(url, origin="http://evil.example") == 403
    assert ws_refusal(url, origin="null") == 403
    assert ws_refusal(url, origin=f"http://127.0.0.1.evil.example:{port}") == 403
    health = json.loads(http_get(port, "/health").body)
    assert "h-evil" not in health["sessions"]  # the refused handshake never reached a session
    assert list(live_server.record_dir.glob("h-evil*")) == []
    assert http_get(port, "/health", {"Origin": "http://evil.example"}).status == 403
    # Same-origin, loopback pages and non-browser clients (no Origin) may.
    assert ws_refusal(url, origin=f"http://127.0.0.1:{port}") is None
    assert ws_refusal(url, origin="http://localhost:5173") is None
    assert ws_refusal(url, origin="http://[::1]:8000") is None
    assert ws_refusal(url) is None

    # DNS rebinding: evil.example resolving to 127.0.0.1 still says Host: evil.example.
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example"):
        assert http_get(port, "/", {"Host": host}).status == 403, host
        assert http_get(port, "/health", {"Host": host}).status == 403, host
        assert http_get(port, "/ws?session=h-evil", {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade",
                                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                     "Sec-WebSocket-Version": "13"}).status == 403, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert http_get(port, "/", {"Host": host}).status == 200, host


def test_allow_origin_allow_host_and_the_token_on_every_path(test_bank_path, tmp_path):
    server = start_server(test_bank_path, tmp_path / "rec", "--token", "s3cret", "--allow-origin",
                          "https://page.example", "--allow-host", "music.lan")
    try:
        port = server.port
        # In token mode, /health (it lists sessions) and the page's files need the token too.
        for path in ("/health", "/app.js", "/worklet.js", "/style.css", "/", "/index.html"):
            assert http_get(port, path).status == 403, path
            assert http_get(port, path + "?token=wrong").status == 403, path
            assert http_get(port, path + "?token=s3cret").status == 200, path
        # The page hands its own files the token by a same-site cookie (they are fetched without ?token=).
        page = http_get(port, "/?token=s3cret")
        cookie = page.getheader("Set-Cookie").split(";")[0]
        assert "HttpOnly" in page.getheader("Set-Cookie") and "SameSite=Strict" in page.getheader("Set-Cookie")
        assert http_get(port, "/app.js", {"Cookie": cookie}).status == 200
        assert http_get(port, "/health", {"Cookie": cookie}).status == 200
        assert http_get(port, "/app.js", {"Cookie": cookie.split("=")[0] + "=nope"}).status == 403
        assert ws_refusal(server.ws_url("h-tok"), additional_headers={"Cookie": cookie}) == 403  # /ws: ?token=

        # --allow-origin admits that page (with the token), and no other.
        url = server.ws_url("h-tok", token="s3cret")
        assert ws_refusal(url, origin="https://page.example") is None
        assert ws_refusal(url, origin="https://other.example") == 403
        assert ws_refusal(server.ws_url("h-tok"), origin="https://page.example") == 403  # still needs the token
        # --allow-host: the server answers to that name.
        assert http_get(port, "/health?token=s3cret", {"Host": f"music.lan:{port}"}).status == 200
        assert http_get(port, "/health?token=s3cret", {"Host": "other.lan"}).status == 403
    finally:
        assert stop_server(server) == 0
