"""GET /recordings/NAME (docs/protocol.md, "Downloads") over real HTTP against a real `musicrfm serve`: a
recording's files as attachments, nothing else from the disk, and the same access rules as every route."""

from __future__ import annotations

import functools
import os

import pytest

from live_client import LiveClient
from live_server import http_get, start_server, stop_server


# Downloads may be large: a longer socket timeout than the other HTTP tests'.
http_get = functools.partial(http_get, timeout=30.0)


def test_a_recording_downloads_as_an_attachment(live_server):
    with LiveClient(live_server.ws_url("dl-real")) as c:
        c.request({"type": "transport", "command": "play", "id": "p"})
        mark = c.mark()
        c.send({"type": "record", "command": "start"})
        c.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
        c.wait_audio(10, since=c.audio_mark())
        mark = c.mark()
        c.send({"type": "record", "command": "stop"})
        done = c.wait(lambda m: m["type"] == "recording" and m["status"] == "stopped", since=mark)
        c.send({"type": "transport", "command": "stop"})
    for path, kind in ((done["wav"], "audio/wav"), (done["log"], "application/x-ndjson")):
        name = os.path.basename(path)
        response = http_get(live_server.port, f"/recordings/{name}")
        assert response.status == 200, response.body
        assert response.getheader("Content-Type") == kind
        assert response.getheader("Content-Disposition") == f'attachment; filename="{name}"'
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        with open(path, "rb") as fh:
            assert response.body == fh.read()
        assert int(response.getheader("Content-Length")) == len(response.body)


def test_only_files_directly_in_the_record_dir_are_served(live_server):
    rec = live_server.record_dir
    secret = rec.parent / "secret.wav"
    secret.write_bytes(b"RIFF secret outside the record dir")
    (rec / "sub").mkdir(exist_ok=True)
    (rec / "sub" / "inner.wav").write_bytes(b"RIFF in a subfolder")
    (rec / "folder.wav").mkdir(exist_ok=True)
    (rec / "link.wav").unlink(missing_ok=True)
    (rec / "link.wav").symlink_to(secret)
    (rec / ".hidden.wav").write_bytes(b"RIFF hidden")
    (rec / "notes.txt").write_bytes(b"not a recording")
    (rec / "ok-0-1.wav").write_bytes(b"RIFF fine")

    assert http_get(live_server.port, "/recordings/ok-0-1.wav").body == b"RIFF fine"
    for path in ["/recordings/../secret.wav", "/recordings/%2e%2e/secret.wav", "/recordings/..%2fsecret.wav",
                 "/recordings/%2E%2E%2Fsecret.wav", "/recordings/sub/inner.wav", "/recordings/sub%2finner.wav",
                 "/recordings//secret.wav", "/recordings/link.wav", "/recordings/folder.wav",
                 "/recordings/.hidden.wav", "/recordings/notes.txt", "/recordings/", "/recordings",
                 "/recordings/missing-0-1.wav", "/recordings/ok-0-1.wav%00.txt", "/recordings/ok-0-1.WAV",
                 "/recordings/" + "a" * 201 + ".wav", "/recordings/" + "a" * 5000 + ".wav",
                 "/recordings/ok-0-1.wav/..", "/recordings/..\\secret.wav"]:
        response = http_get(live_server.port, path)
        assert response.status == 404, (path, response.status)
        assert b"secret" not in response.body and b"RIFF" not in response.body, path
    assert http_get(live_server.port, "/recordings/" + "a" * 200 + ".wav").status == 404  # a fitting name, no file


def test_a_recording_too_large_to_send_from_memory_is_refused(live_server):
    from musicrfm.server.app import DOWNLOAD_MAX_BYTES

    big = live_server.record_dir / "big-0-1.wav"
    with big.open("wb") as fh:
        fh.truncate(DOWNLOAD_MAX_BYTES + 1)  # sparse: nothing is written, and nothing is read
    try:
        response = http_get(live_server.port, "/recordings/big-0-1.wav")
        assert response.status == 503 and b"record-dir" in response.body
    finally:
        big.unlink()


def test_downloads_follow_the_origin_and_host_rules(live_server):
    (live_server.record_dir / "rules-0-1.wav").write_bytes(b"RIFF rules")
    port = live_server.port
    assert http_get(port, "/recordings/rules-0-1.wav", {"Origin": "http://evil.example"}).status == 403
    assert http_get(port, "/recordings/rules-0-1.wav", {"Host": "evil.example"}).status == 403
    assert http_get(port, "/recordings/rules-0-1.wav", {"Origin": f"http://127.0.0.1:{port}"}).status == 200


def test_downloads_need_the_token_in_token_mode(test_bank_path, tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "tok-0-1.wav").write_bytes(b"RIFF token")
    server = start_server(test_bank_path, rec, "--token", "s3cret")
    try:
        port, path = server.port, "/recordings/tok-0-1.wav"
        assert http_get(port, path).status == 403
        assert http_get(port, path + "?token=wrong").status == 403
        response = http_get(port, path + "?token=s3cret")
        assert response.status == 200 and response.body == b"RIFF token"
        # The page's cookie (what a click on the page's link sends) does too.
        cookie = http_get(port, "/?token=s3cret").getheader("Set-Cookie").split(";")[0]
        assert http_get(port, path, {"Cookie": cookie}).body == b"RIFF token"
        assert http_get(port, path, {"Cookie": cookie.split("=")[0] + "=nope"}).status == 403
        # Refused before anything else: a missing file is a 403 too, so names cannot be probed.
        assert http_get(port, "/recordings/missing-0-1.wav").status == 403
        assert http_get(port, "/recordings/../secret.wav").status == 403
    finally:
        assert stop_server(server) == 0


@pytest.mark.parametrize("name", ["a.wav", "main-0-20261201T120000123456.jsonl", "A_b-9.wav"])
def test_recording_names_the_server_writes_fit(name):
    from musicrfm.server.app import RECORDING_NAME

    assert RECORDING_NAME.fullmatch(name)
