"""protocol.connection, the one client connection: against the real `musicrfm serve` (the `live_server`
fixture: tiny-random, its audio is noise) for what a session does, and against scripted WebSocket servers
for the ways joining fails."""

from __future__ import annotations

import asyncio
import socket
from http import HTTPStatus

import pytest

from musicrfm.protocol.connection import (AudioFrame, Closed, ConnectError, Connection, HandshakeRefused,
                                          normalize_url, redact)
from musicrfm.protocol.wire import encode_message


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 120))


async def next_matching(conn: Connection, predicate) -> dict | AudioFrame:
    async for item in conn:
        if predicate(item):
            return item
    raise AssertionError(f"the connection closed first: code {conn.close_code} {conn.close_reason}")


def test_a_session_over_one_connection(live_server):
    """Join by a bare host:port, read the hello, change a knob (the echo carries the id), get an error for a
    bad message (with its id), play: contiguous audio frames; close cleanly with 1000."""

    async def main():
        conn = await Connection.open(f"{live_server.host}:{live_server.port}", session="conn-a")
        async with conn:
            assert conn.url.endswith("/ws?session=conn-a&encoding=msgpack") and conn.encoding == "msgpack"
            hello = conn.hello
            assert hello["type"] == "hello" and hello["session"] == "conn-a" and hello["channels"] == 1
            assert isinstance(conn.hello_frame, bytes)  # msgpack asked for, msgpack answered
            assert hello["random_weights"] is True and "noise" in hello["note"]

            await conn.send({"type": "set", "id": "k1", "directions": {"notes:C": {"coefficient": 0.5}}})
            echo = await next_matching(conn, lambda m: isinstance(m, dict) and m["type"] in ("state", "error"))
            assert echo["type"] == "state" and echo["cause"]["id"] == "k1"
            assert echo["state"]["directions"]["notes:C"]["coefficient"] == 0.5

            await conn.send({"type": "set", "id": "bad", "directions": {"notes:H": {"coefficient": 0.5}}})
            error = await next_matching(conn, lambda m: isinstance(m, dict) and m["type"] == "error")
            assert error["id"] == "bad" and "notes:H" in error["message"]

            await conn.send({"type": "transport", "command": "play", "id": "p"})
            frames = []
            while len(frames) < 4:
                frames.append(await next_matching(conn, lambda m: isinstance(m, AudioFrame)))
            for a, b in zip(frames, frames[1:]):
                assert b.header.epoch == a.header.epoch
                assert b.header.first_sample == a.header.first_sample + a.header.num_samples
            assert all(f.pcm.dtype.name == "float32" and len(f.pcm) == f.header.num_samples for f in frames)
            assert all(f.header.sample_rate == hello["sample_rate"] for f in frames)
            await conn.send({"type": "transport", "command": "stop"})
        assert conn.close_code == 1000
        with pytest.raises(Closed) as closed:
            await conn.recv()
        assert closed.value.code == 1000
        with pytest.raises(Closed):
            await conn.send({"type": "get"})
        assert [item async for item in conn] == []  # iteration ends at the close

    run(main())


def test_json_encoding_and_the_url_as_given(live_server):
    async def main():
        async with await Connection.open(live_server.ws_url("conn-j"), encoding=None) as conn:
            assert "encoding" not in conn.url and conn.encoding == "json"
            assert isinstance(conn.hello_frame, str)  # the server's default: JSON text
            await conn.send({"type": "get", "id": "g"})
            state = await next_matching(conn, lambda m: isinstance(m, dict) and m["type"] == "state")
            assert state["id"] == "g"

    run(main())


def test_refused_handshakes_name_the_status(live_server):
    async def main():
        with pytest.raises(HandshakeRefused, match=r"HTTP 404: not found: /nope \(is the path /ws\?\)") as refused:
            await Connection.open(f"ws://{live_server.host}:{live_server.port}/nope?token=secret")
        assert refused.value.status == 404
        assert "secret" not in str(refused.value)  # the token is never printed

    run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_connect_error():
    port = free_port()  # bound then released: nothing listens there
    with pytest.raises(ConnectError, match=f"cannot connect to ws://127.0.0.1:{port}/ws.*connection refused"):
        run(Connection.open(f"127.0.0.1:{port}"))


@pytest.mark.parametrize("script, expected", [
    ("forbid", r"HTTP 403: a token is required$"),  # the server's own reason
    ("forbid-silently", r"HTTP 403 \(a token is needed or wrong: --token\)"),  # none: a guess from the status
    ("close", r"closed the connection before its hello: code 1008 \(policy violation\): bad session"),
    ("error", r"the server refused: full"),
    ("state", r"expected a hello first, got 'state'"),
    ("garbage", r"first message is not a hello"),
    ("silent", r"no hello from the server within 0.5 s"),
])
def test_joining_fails_with_a_clear_error(script, expected):
    from websockets.asyncio.server import serve

    async def handler(ws):
        if script == "close":
            await ws.close(1008, "bad session")
        elif script == "error":
            await ws.send(encode_message({"type": "error", "id": None, "message": "full"}))
        elif script == "state":
            await ws.send(encode_message({"type": "state"}))
        elif script == "garbage":
            await ws.send("{not json")
        await ws.wait_closed()

    def process_request(connection, request):
        if script == "forbid":
            return connection.respond(HTTPStatus.FORBIDDEN, "a token is required\n")
        if script == "forbid-silently":
            return connection.respond(HTTPStatus.FORBIDDEN, "")
        return None

    async def main():
        async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
            port = server.sockets[0].getsockname()[1]
            await Connection.open(f"127.0.0.1:{port}", hello_timeout=0.5)

    with pytest.raises(ConnectError, match=expected):
        run(main())


def test_urls():
    assert normalize_url("h:1", session="s", token="t") == "ws://h:1/ws?session=s&token=t&encoding=msgpack"
    assert normalize_url("ws://h:1/ws?session=s&encoding=json", encoding=None) == "ws://h:1/ws?session=s&encoding=json"
    assert normalize_url("ws://h:1/ws?session=s", encoding=None) == "ws://h:1/ws?session=s"
    assert redact("ws://h:1/ws?session=s&token=t") == "ws://h:1/ws?session=s&token=..."
