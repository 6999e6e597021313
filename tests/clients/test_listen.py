"""The speaker client, `musicrfm listen`: the jitter buffer and resampler (pure), the outputs, the client
against a scripted WebSocket server, the command line, and the client against the real `musicrfm serve`
(the `live_server` fixture; random weights: its audio is noise)."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from musicrfm.clients.listen import (AudioUnavailable, FakeOutput, JitterBuffer, LinearResampler, SpeakerClient,
                                     _Console, _import_sounddevice)
from musicrfm.protocol.connection import normalize_url
from musicrfm.protocol.wire import AudioHeader, decode_message, encode_message, pack_audio

CLI = [shutil.which("musicrfm")] if shutil.which("musicrfm") else [sys.executable, "-m", "musicrfm"]
REPO = Path(__file__).resolve().parents[2]


def env():
    e = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{sys.prefix}/bin:/usr/bin:/bin",
         "PYTHONPATH": str(REPO)}
    if "HOME" in os.environ:
        e["HOME"] = os.environ["HOME"]
    return e


def noise(n, seed=0):
    return np.random.default_rng(seed).uniform(-0.9, 0.9, n).astype(np.float32)


def quiet_console():
    class Sink:
        def __init__(self):
            self.text = []

        def write(self, s):
            self.text.append(s)

        def flush(self):
            pass

        def isatty(self):
            return False

    out, err = Sink(), Sink()
    console = _Console(out=out, err=err, status=True, interval=0.5)
    return console, out, err


# --- JitterBuffer -----------------------------------------------------------------------------------


def test_prebuffer_holds_output_until_reached():
    jb = JitterBuffer(8000, prebuffer=0.2)  # 1600 samples
    x = noise(1600)
    jb.push(0, x[:1599])
    assert not jb.read(100).any() and not jb.playing
    assert jb.level == 1599  # nothing consumed while prebuffering
    jb.push(1599, x[1599:])
    out = jb.read(100)
    assert jb.playing and np.array_equal(out, x[:100])
    s = jb.stats()
    assert s.underruns == 0 and s.silence_samples == 100 and s.played_samples == 100


def test_continuity_across_odd_chunk_and_read_sizes():
    rng = np.random.default_rng(1)
    x = noise(40_000, seed=2)
    jb = JitterBuffer(8000, prebuffer=0.05, max_seconds=2.0)  # 400 samples
    pushed, out = 0, []
    while pushed < len(x):
        n = int(rng.choice([1, 7, 333, 641, 1000, 1999]))
        jb.push(pushed, x[pushed:pushed + n])
        pushed += min(n, len(x) - pushed)
        while jb.level > 2500:  # the device reads in odd blocks, staying behind the network
            out.append(jb.read(int(rng.choice([3, 129, 500, 1023]))))
    jb.end_of_stream()
    while jb.level:
        out.append(jb.read(257))
    out = np.concatenate(out)
    start = np.flatnonzero(out)[0]
    assert start == 0  # the first read already found more than the prebuffer
    np.testing.assert_array_equal(out[:len(x)], x)
    assert not out[len(x):].any()
    s = jb.stats()
    assert s.underruns == 0 and s.gaps == 0 and s.overlaps == 0 and s.overflows == 0
    assert s.stream_samples == len(x) and s.played_samples == len(x)


def test_underrun_outputs_silence_counts_and_rebuffers():
    jb = JitterBuffer(8000, prebuffer=0.1)  # 800 samples
    x = noise(3000)
    jb.push(0, x[:1000])
    out = jb.read(1024)  # 1000 samples of audio, then dry
    np.testing.assert_array_equal(out[:1000], x[:1000])
    assert not out[1000:].any()
    assert jb.stats().underruns == 1 and not jb.playing
    jb.push(1000, x[1000:1500])  # 500 < prebuffer: still silent, not another underrun
    assert not jb.read(200).any()
    assert jb.stats().underruns == 1 and jb.level == 500
    jb.push(1500, x[1500:1800])  # 800 queued: resumes exactly where the stream left off
    np.testing.assert_array_equal(jb.read(800), x[1000:1800])
    s = jb.stats()
    assert s.underruns == 1 and s.gaps == 0 and s.played_samples == 1800
    assert s.silence_samples == 24 + 200


def test_end_of_stream_plays_out_below_prebuffer_without_underrun():
    jb = JitterBuffer(8000, prebuffer=0.2)
    x = noise(300)
    jb.push(0, x)
    assert not jb.read(64).any()
    jb.end_of_stream()
    out = np.concatenate([jb.read(128) for _ in range(4)])
    np.testing.assert_array_equal(out[:300], x)
    assert not out[300:].any()
    assert jb.stats().underruns == 0 and not jb.playing
    jb.push(300, x)  # the stream resumes (after a pause): prebuffering again
    assert not jb.read(64).any()


def test_gap_inserts_counted_silence_and_overlap_drops_repeats():
    jb = JitterBuffer(8000, prebuffer=0.0)
    x = noise(3000)
    a = jb.push(1000, x[1000:2000])  # a listener joining mid-stream starts wherever the stream is
    b = jb.push(2500, x[2500:3000])  # samples 2000..2499 never arrived
    assert len(a) == 1000 and len(b) == 1000 and not b[:500].any()
    np.testing.assert_array_equal(b[500:], x[2500:3000])
    c = jb.push(2900, x[2900:3000])  # entirely repeated
    d = jb.push(2950, np.concatenate([x[2950:3000], x[:10]]))  # partly repeated
    assert len(c) == 0 and len(d) == 10
    out = jb.read(2010)
    np.testing.assert_array_equal(out[:1000], x[1000:2000])
    assert not out[1000:1500].any()
    np.testing.assert_array_equal(out[1500:2000], x[2500:3000])
    np.testing.assert_array_equal(out[2000:], x[:10])
    s = jb.stats()
    assert (s.gaps, s.missing_stream_samples, s.overlaps, s.underruns) == (1, 500, 2, 0)


def test_epoch_change_restarts_the_timeline_and_stale_epochs_are_dropped():
    jb = JitterBuffer(8000, prebuffer=0.0)
    x, y = noise(800, seed=3), noise(800, seed=4)
    jb.push(4000, x, epoch=2)
    jb.push(0, y, epoch=3)  # a reset: the new stream starts at sample 0; the old one's end still plays
    assert len(jb.push(4800, x, epoch=2)) == 0  # late frame of the old stream
    np.testing.assert_array_equal(jb.read(1600), np.concatenate([x, y]))
    s = jb.stats()
    assert (s.epoch_changes, s.stale_frames, s.gaps, s.overlaps) == (1, 1, 0, 0)
    assert jb.epoch == 3


def test_overflow_drops_the_oldest_and_counts():
    jb = JitterBuffer(8000, prebuffer=0.1, max_seconds=0.5)  # holds 4000
    jb.push(0, noise(4000))  # exactly full is not an overflow
    assert jb.stats().overflows == 0 and jb.level == 4000
    jb = JitterBuffer(8000, prebuffer=0.1, max_seconds=0.5)
    x = noise(5000)
    for i in range(0, 5000, 1000):
        jb.push(i, x[i:i + 1000])
    s = jb.stats()
    assert jb.level == 4000 and s.overflows == 1 and s.dropped_samples == 1000
    np.testing.assert_array_equal(jb.read(4000), x[1000:])
    jb.push(5000, noise(9000, seed=5))  # one frame bigger than the whole buffer: its newest part stays
    s = jb.stats()
    assert jb.level == 4000 and s.overflows == 2 and s.dropped_samples == 1000 + 5000


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="prebuffer"):
        JitterBuffer(8000, prebuffer=3.0, max_seconds=2.0)
    with pytest.raises(ValueError):
        JitterBuffer(0)


# --- resampling -------------------------------------------------------------------------------------


def _resample_in_chunks(x, rin, rout, sizes):
    r = LinearResampler(rin, rout)
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(r.process(x[i:i + n]))
        i, k = i + n, k + 1
    return np.concatenate(out)


@pytest.mark.parametrize("rout", [48000, 44100])
def test_resampling_keeps_a_sines_frequency_and_is_continuous_across_chunks(rout):
    rin, f = 32000, 440.0
    t = np.arange(rin * 2) / rin
    x = (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    y = _resample_in_chunks(x, rin, rout, [1, 641, 7, 3200, 333, 1999])
    whole = LinearResampler(rin, rout).process(x)
    np.testing.assert_array_equal(y, whole)  # chunk boundaries change nothing, bit for bit
    assert abs(len(y) - len(x) * rout / rin) <= 2
    # the same sine at the new rate: peak at 440 Hz, and sample by sample close to the analytic sine
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak = np.fft.rfftfreq(len(y), 1 / rout)[np.argmax(spectrum)]
    assert abs(peak - f) <= rout / len(y)
    expected = 0.5 * np.sin(2 * np.pi * f * np.arange(len(y)) / rout)
    assert np.max(np.abs(y - expected)) < 2e-3  # linear interpolation error bound: (w/rin)^2/8 * 0.5
    # no seams: no step between neighbours beyond what the sine itself does
    assert np.max(np.abs(np.diff(y))) <= 0.5 * 2 * np.pi * f / rout + 1e-3


def test_jitter_buffer_resamples_through_gaps_and_reads_exact_blocks():
    jb = JitterBuffer(32000, 48000, prebuffer=0.0)
    t = np.arange(32000) / 32000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sizes, i = [640, 17, 1283], 0
    while i < len(x):
        n = sizes[i % 3]
        jb.push(i, x[i:i + n])
        i += n
    y = np.concatenate([jb.read(480) for _ in range(99)])
    np.testing.assert_array_equal(y, LinearResampler(32000, 48000).process(x)[:len(y)])
    assert all(len(jb.read(n)) == n for n in (1, 1023, 5))


# --- outputs ----------------------------------------------------------------------------------------


def test_fake_output_pulls_at_real_time_pace():
    out = FakeOutput(8000, blocksize=400)
    assert out.open(32000) == 8000
    n = [0]

    def pull(block):
        block[:] = n[0]
        n[0] += 1

    out.start(pull)
    time.sleep(0.5)
    out.stop()
    assert 0.35 * 8000 <= out.pulled <= 0.65 * 8000 + 400
    got = out.audio()
    assert len(got) == out.pulled and np.array_equal(got[::400], np.arange(len(got) // 400))


def test_missing_portaudio_is_a_clear_message(monkeypatch):
    class NoPortAudio:
        def find_spec(self, name, path=None, target=None):
            if name == "sounddevice":
                raise OSError("PortAudio library not found")
            return None

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoPortAudio(), *sys.meta_path])
    with pytest.raises(AudioUnavailable, match="libportaudio2"):
        _import_sounddevice()


# --- URLs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, want", [
    ("ws://h:1/ws?session=a", "ws://h:1/ws?session=a&encoding=msgpack"),
    ("http://h:1/?session=x", "ws://h:1/ws?session=x&encoding=msgpack"),
    ("https://h/live/", "wss://h/live/ws?session=main&encoding=msgpack"),
    ("localhost:9", "ws://localhost:9/ws?session=main&encoding=msgpack"),
    ("localhost", "ws://localhost:8765/ws?session=main&encoding=msgpack"),
    ("ws://h:1", "ws://h:1/ws?session=main&encoding=msgpack"),
])
def test_urls_are_normalised(url, want):
    assert normalize_url(url) == want


def test_url_overrides_and_bad_names():
    assert normalize_url("h:1/ws?session=a&token=t&encoding=json", session="b", token="s") == \
        "ws://h:1/ws?session=b&token=s&encoding=msgpack"
    with pytest.raises(ValueError, match="session name"):
        normalize_url("h:1", session="no spaces")
    with pytest.raises(ValueError, match="scheme"):
        normalize_url("ftp://h:1/")


# --- the client against a scripted server (the protocol as written) --------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScriptedServer:
    """A minimal server following docs/protocol.md: hello, then paced audio frames after a play."""

    def __init__(self, audio, *, chunk=3200, rate=32000, epoch=0, close_with=None, gap_at=None):
        self.audio, self.chunk, self.rate, self.epoch = audio, chunk, rate, epoch
        self.close_with, self.gap_at = close_with, gap_at
        self.received, self.close_codes, self.queries, self.sent = [], [], [], 0

    async def handler(self, ws):
        self.queries.append(ws.request.path)
        enc = "msgpack" if "encoding=msgpack" in ws.request.path else "json"
        hello = {"type": "hello", "protocol": 1, "session": "t", "client_id": 1, "sample_rate": self.rate,
                 "channels": 1, "frame_rate": 50.0, "hop": 640, "model": "tiny-random", "random_weights": True,
                 "note": "random weights: the audio is noise, not music", "directions": [], "version": 0,
                 "epoch": self.epoch, "step": 0, "state": {"playback": "stopped"}}
        await ws.send(encode_message(hello, enc))
        try:
            msg = decode_message(await ws.recv())
            self.received.append(msg)
            await ws.send(encode_message({"type": "state", "version": 1, "epoch": self.epoch, "step": 0,
                                          "state": {"playback": "playing"}}, enc))
            await ws.send(encode_message({"type": "warning", "message": "slow"}, enc))
            t0 = time.monotonic()
            for i in range(0, len(self.audio), self.chunk):
                if self.gap_at is not None and i == self.gap_at:
                    continue
                pcm = self.audio[i:i + self.chunk]
                head = AudioHeader(1, self.rate, i, i // 640, (i + len(pcm)) // 640, self.epoch, len(pcm))
                await ws.send(pack_audio(head, pcm))
                self.sent = i + len(pcm)
                if self.close_with is not None and i >= len(self.audio) // 2:
                    await ws.close(self.close_with, "scripted")
                    return
                # pace: stay about 0.3 s ahead of real time
                ahead = (i + len(pcm)) / self.rate - (time.monotonic() - t0)
                if ahead > 0.3:
                    await asyncio.sleep(ahead - 0.3)
            await ws.wait_closed()
        finally:
            self.close_codes.append(ws.close_code)


def run_scripted(server, **listener_kwargs):
    from websockets.asyncio.server import serve

    stop_after = listener_kwargs.pop("stop_after", None)

    async def main():
        async with serve(server.handler, "127.0.0.1", 0) as srv:
            port = srv.sockets[0].getsockname()[1]
            listener = SpeakerClient(f"127.0.0.1:{port}", session="t", **listener_kwargs)
            if stop_after is not None:
                asyncio.get_running_loop().call_later(stop_after, listener.stop, "interrupted")
            result = await listener.run()
            await asyncio.sleep(0.1)  # let the server's handler see the close
            return result

    return asyncio.run(main())


def test_client_plays_a_scripted_stream_exactly_and_closes_with_1000(tmp_path):
    audio = noise(32000 * 2, seed=7)
    server = ScriptedServer(audio)
    fake = FakeOutput(blocksize=500)
    console, out, err = quiet_console()
    result = run_scripted(server, output=fake, console=console, play=True, seconds=1.5, keep_audio=True,
                          out=tmp_path / "got.wav")
    n = 48000
    assert server.received[0] == {"type": "transport", "command": "play", "id": "listen-play"}
    assert "encoding=msgpack" in server.queries[0] and "session=t" in server.queries[0]
    assert server.close_codes == [1000] and result.close_code == 1000 and result.clean
    assert result.stream_seconds == 1.5
    np.testing.assert_array_equal(result.audio, audio[:n])
    played = fake.audio()
    start = np.flatnonzero(played)[0]
    np.testing.assert_array_equal(played[start:start + n], audio[:n])  # drained to the end, no seams
    assert result.stats.underruns == 0
    text = "".join(out.text)
    assert "noise, not music" in text and "tiny-random" in text
    assert "server warning: slow" in "".join(err.text)
    from musicrfm.engine.audio import read_wav

    wav, rate = read_wav(tmp_path / "got.wav")
    assert rate == 32000 and len(wav) == n and np.max(np.abs(wav - audio[:n])) < 1e-4


def test_client_fills_a_missing_frame_and_resamples(tmp_path):
    audio = noise(32000, seed=8)
    server = ScriptedServer(audio, chunk=3200, gap_at=6400)
    fake = FakeOutput(48000, blocksize=480)
    console, _, _ = quiet_console()
    result = run_scripted(server, output=fake, console=console, play=True, seconds=0.9, keep_audio=True)
    assert result.output_rate == 48000
    assert result.stats.gaps == 1 and result.stats.missing_stream_samples == 3200
    want = audio[:28800].copy()
    want[6400:9600] = 0
    np.testing.assert_array_equal(result.audio, want)


def test_stop_closes_cleanly_and_server_close_is_reported():
    console, _, _ = quiet_console()
    server = ScriptedServer(noise(32000 * 3))
    result = run_scripted(server, output=FakeOutput(keep=False), console=console, play=True, stop_after=1.0)
    assert server.close_codes == [1000] and result.closed_by == "client" and result.clean
    assert 0.5 < result.stream_seconds < 3

    console, _, err = quiet_console()
    server = ScriptedServer(noise(32000 * 2), close_with=1013)
    result = run_scripted(server, output=FakeOutput(keep=False), console=console, play=True)
    assert result.closed_by == "server" and result.close_code == 1013 and not result.clean
    assert "1013" in "".join(err.text)


def test_refused_handshake_and_early_close_are_clear_errors():
    from http import HTTPStatus

    from websockets.asyncio.server import serve

    from musicrfm.clients.listen import ListenError

    def forbid(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "a token is required\n")

    async def close_at_once(ws):
        await ws.close(1008, "bad session")

    async def attempt(**kwargs):
        async with serve(close_at_once, "127.0.0.1", 0, **kwargs) as srv:
            port = srv.sockets[0].getsockname()[1]
            console, _, _ = quiet_console()
            await SpeakerClient(f"127.0.0.1:{port}", FakeOutput(keep=False), console=console).run()

    with pytest.raises(ListenError, match="HTTP 403: a token is required"):  # the server says why
        asyncio.run(attempt(process_request=forbid))
    with pytest.raises(ListenError, match="before its hello.*1008.*bad session"):
        asyncio.run(attempt())


# --- the command line -------------------------------------------------------------------------------


def test_cli_unreachable_server_is_one_clear_line(tmp_path):
    port = free_port()  # bound then released: nothing listens there
    r = subprocess.run([*CLI, "listen", f"ws://127.0.0.1:{port}/ws?session=x"], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "cannot connect" in lines[0] and f"127.0.0.1:{port}" in lines[0] and "Traceback" not in r.stderr


# --- against the real server (`musicrfm serve --model tiny-random`: random weights, its audio is noise) ---


def interior_silence(played):
    """Zero samples between the first and the last non-zero one: what the listener heard as dropouts."""
    nz = np.flatnonzero(played)
    return 0 if len(nz) == 0 else int(nz[-1] - nz[0] + 1 - len(nz))


def test_listen_to_the_live_server(live_server, tmp_path):
    fake = FakeOutput(blocksize=512)
    console, out, err = quiet_console()
    listener = SpeakerClient(live_server.ws_url("listen-fake"), fake, play=True, seconds=2.0, keep_audio=True,
                        out=tmp_path / "heard.wav", console=console)
    result = asyncio.run(listener.run())
    assert result.clean and result.closed_by == "client" and result.close_code == 1000, "".join(err.text)
    assert result.hello["model"] == "tiny-random" and result.hello["random_weights"] is True
    assert "noise" in "".join(out.text)  # random weights are never passed off as music
    got, s = result.audio, result.stats
    assert result.stream_seconds == 2.0 and len(got) == 64000
    assert (s.gaps, s.overlaps, s.stale_frames, s.overflows) == (0, 0, 0, 0)  # the server's timeline is whole
    # non-silent all along: every 20 ms of what arrived carries signal
    assert np.sqrt(np.mean(got.reshape(-1, 640) ** 2, axis=1)).min() > 1e-3
    # the fake device played all of it, in order, nothing repeated or lost
    played = fake.audio()
    np.testing.assert_array_equal(played[played != 0], got[got != 0])
    # After the prebuffer, no underruns while the server keeps up with real time. On a loaded machine it may
    # not (it says so with a warning): then the client must rebuffer properly rather than stutter per block.
    slow = any("slower than real time" in w for w in result.warnings)
    if not slow:
        assert s.underruns <= 1 and interior_silence(played) <= 0.1 * 32000, s
    else:
        assert s.underruns <= 2.0 / listener.prebuffer, s  # each underrun waits for 0.2 s of audio again
    from musicrfm.engine.audio import read_wav

    wav, rate = read_wav(tmp_path / "heard.wav")
    assert rate == 32000 and len(wav) == 64000 and np.max(np.abs(wav - got)) < 1e-4


def test_cli_ctrl_c_closes_cleanly(live_server, tmp_path):
    proc = subprocess.Popen([*CLI, "listen", live_server.ws_url("listen-sigint"), "--play", "--no-audio",
                             "--out", str(tmp_path / "cut.wav")], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait until the stream plays
            lines.append(line)
            if line.startswith("playing"):
                break
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text + err
    assert "closed by us (code 1000)" in text and "Traceback" not in err
    from musicrfm.engine.audio import read_wav

    wav, _ = read_wav(tmp_path / "cut.wav")  # the file is complete (header finalised) after Ctrl-C
    assert len(wav) > 0.5 * 32000


ALSA_NULL_CONF = """\
<{alsa_conf}>
pcm.musicrfm_null {{
    type null
    hint {{ show on description "musicrfm test sink (discards audio)" }}
}}
"""

NULL_DEVICE_RUN = """\
import asyncio, json, sys
from musicrfm.clients.listen import AudioUnavailable, SpeakerClient, SoundDeviceOutput, _Console, _import_sounddevice
try:
    sd = _import_sounddevice()
except AudioUnavailable as exc:
    print(json.dumps({"skip": str(exc)})); sys.exit(0)
names = [d["name"] for d in sd.query_devices()]
if "musicrfm_null" not in names:
    print(json.dumps({"skip": f"PortAudio does not list the ALSA pcm musicrfm_null (it lists {names})"})); sys.exit(0)
out = SoundDeviceOutput("musicrfm_null", rate=48000)
r = asyncio.run(SpeakerClient(sys.argv[1], out, play=True, seconds=2.0, console=_Console(status=False)).run())
print(json.dumps({"clean": r.clean, "code": r.close_code, "rate": r.output_rate, "seconds": r.stream_seconds,
                  "played": r.stats.played_samples, "gaps": r.stats.gaps, "callbacks": out.callbacks,
                  "frames": out.frames, "nonzero_frames": out.nonzero_frames, "device": out.describe()}))
"""


def test_listen_through_a_portaudio_null_device(live_server, tmp_path):
    """A real PortAudio stream on ALSA's null pcm, defined in a config file of our own (ALSA_CONFIG_PATH):
    PortAudio skips the stock `null` pcm but lists one under another name. The null pcm has no clock (it
    takes samples as fast as they come), so this checks the device path, not the pacing."""
    alsa_conf = Path("/usr/share/alsa/alsa.conf")
    if not alsa_conf.exists():
        pytest.skip("no ALSA configuration (/usr/share/alsa/alsa.conf; Debian package libasound2-data)")
    conf = tmp_path / "asound.conf"
    conf.write_text(ALSA_NULL_CONF.format(alsa_conf=alsa_conf))
    e = dict(env(), ALSA_CONFIG_PATH=str(conf))
    listed = subprocess.run([*CLI, "listen", "--list-devices"], env=e, capture_output=True, text=True, timeout=120)
    r = subprocess.run([sys.executable, "-c", NULL_DEVICE_RUN, live_server.ws_url("listen-null")], cwd=tmp_path,
                       env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    assert listed.returncode == 0 and "musicrfm_null" in listed.stdout
    assert report["clean"] and report["code"] == 1000 and report["seconds"] == 2.0 and report["gaps"] == 0
    assert report["rate"] == 48000 and "musicrfm_null" in report["device"]
    # the device's callback took all of the audio (resampled to 48 kHz), with signal in it
    assert report["played"] >= 2.0 * 48000 - 2 and report["nonzero_frames"] >= 2.0 * 48000 * 0.9
    assert report["callbacks"] > 0 and report["frames"] >= report["played"]
