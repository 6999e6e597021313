"""protocol.wav, the one WAV implementation: the files are byte for byte what the stdlib `wave` module
writes, the streaming writer leaves a valid file after every chunk, and the readers agree."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import pytest

from musicrfm.protocol.wav import WavWriter, decode_wav, encode_wav, read_wav, to_pcm16, write_wav


def stdlib_wav(pcm: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return buffer.getvalue()


def signal(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.2, 1.2, n).astype(np.float32)


@pytest.mark.parametrize("rate", [16_000, 32_000])
def test_written_files_are_what_the_wave_module_writes(tmp_path, rate):
    audio = signal(1001)
    write_wav(tmp_path / "a.wav", audio, rate)
    assert (tmp_path / "a.wav").read_bytes() == stdlib_wav(to_pcm16(audio), rate)
    assert encode_wav(to_pcm16(audio), rate) == stdlib_wav(to_pcm16(audio), rate)
    assert encode_wav(np.zeros(0, "<i2"), rate) == stdlib_wav(np.zeros(0, "<i2"), rate)


def test_the_streaming_writer_leaves_a_valid_file_after_every_chunk(tmp_path):
    path = tmp_path / "rec.wav"
    audio = signal(32_000, seed=1)
    audio[5] = np.nan  # a live stream does not stop over one bad sample: it becomes silence
    writer = WavWriter(path, 32_000)
    assert read_wav(path)[0].shape == (0,)  # valid before anything was written
    done = 0
    for size in (0, 640, 3200, 1, 27_199 - 1, 1):
        writer.write(audio[done:done + size])
        done += size
        back, rate = read_wav(path)  # not closed: what a crash would leave
        assert rate == 32_000 and len(back) == done == writer.samples
    writer.close()
    clean = np.nan_to_num(audio[:done])
    assert path.read_bytes() == stdlib_wav(to_pcm16(clean), 32_000)
    assert read_wav(path)[0][5] == 0.0


def test_decode_wav_reads_what_streaming_writers_leave_and_read_wav_refuses_a_short_file():
    pcm = to_pcm16(signal(100, seed=2))
    data = bytearray(encode_wav(pcm, 8000))
    data[40:44] = struct.pack("<I", 0xFFFFFFFF)  # a writer that never came back to patch the size
    audio, rate = decode_wav(bytes(data) + b"\x01")  # and half a frame at the end
    assert rate == 8000 and audio.shape == (100, 1)
    np.testing.assert_array_equal(audio[:, 0], pcm.astype(np.float32) / 32768.0)


def test_read_wav_is_strict(tmp_path):
    short = tmp_path / "short.wav"
    short.write_bytes(encode_wav(np.zeros(10, "<i2"), 8000)[:-4])
    with pytest.raises(ValueError, match=r"short.wav: WAV data is truncated \(16 bytes, header promises 20\)"):
        read_wav(short)
    floats = tmp_path / "float.wav"
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4) + b"\x00" * 4
    floats.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(ValueError, match="float.wav: only 16-bit PCM WAV is supported, this file has 32-bit float"):
        read_wav(floats)
    assert decode_wav(floats.read_bytes())[0].tolist() == [[0.0]]  # the lenient reader takes it


def test_bad_rates_are_refused(tmp_path):
    for rate in (0, -1, 32000.0, True):
        with pytest.raises(ValueError, match="sample_rate"):
            write_wav(tmp_path / "x.wav", np.zeros(4, np.float32), rate)
