"""Streaming EnCodec decode against the one-shot reference, input checks, and WAV I/O.

Threshold (docs/streaming-decode.md): with the default settings, the largest figure measured on the two
random-weight codecs was a max error of 8.4e-6 (relative to the one-shot audio's RMS about its mean;
float32 round-off); RMS errors and seam steps stayed below 2e-6. 1e-4 leaves >= 12x headroom, and every
under-provisioned setting measured above it (left_context 5 or 10, hold_back 2, naive chunking).
"""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from musicrfm.engine.audio import (
    CapturedStacks,
    ExactLayout,
    ExactStreamingDecoder,
    StreamingDecoder,
    push_together,
    streaming_decoder,
    decode_tokens,
    read_wav,
    relative_error,
    seam_discontinuity,
    write_wav,
)

MAX_REL_ERROR = 1e-4  # RMS and max error, relative to the one-shot audio's RMS about its mean
MAX_SEAM_STEP = 1e-4  # worst error step at a seam, relative to the one-shot audio's own jumps
# The exact decoder computes what the one-shot decode computes, in other slices: float32 round-off only
# (measured <= 4e-6 max on tiny-random, 1.6e-6 on musicgen-mini, 1.3e-5 on random-small's larger codec).
EXACT_REL_ERROR = 2e-5
HOP = 640


def _codes(frames: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (4, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def codec(tiny):
    return tiny.hf.audio_encoder  # load_model seeds random codecs' codebooks (transformers leaves them 0)


def _stream(codec, codes: torch.Tensor, chunk: int, exact: bool = False, **settings) -> tuple[torch.Tensor, list[int]]:
    """Push codes chunk by chunk; (all audio, sample indices where a non-first segment starts)."""
    dec = ExactStreamingDecoder(codec) if exact else StreamingDecoder(codec, **settings)
    pieces = [dec.push(codes[:, i : i + chunk]) for i in range(0, codes.shape[1], chunk)] + [dec.flush()]
    lengths = [len(p) for p in pieces if len(p)]
    seams = np.cumsum(lengths)[:-1].tolist()
    return torch.cat(pieces), seams


# --- one-shot decode ---------------------------------------------------------------------------------


def test_decode_tokens_shapes_and_batch(codec):
    codes = _codes(30)
    one = decode_tokens(codec, codes)
    assert one.shape == (30 * HOP,) and one.dtype == torch.float32
    batch = decode_tokens(codec, torch.stack([codes, _codes(30, seed=1)]))
    assert batch.shape == (2, 30 * HOP)
    torch.testing.assert_close(batch[0], one, rtol=0, atol=1e-5)
    assert decode_tokens(codec, codes[:, :0]).shape == (0,)


def test_audio_depends_on_codes(codec):
    # Guards the whole file: with all-zero codebooks every comparison below would pass trivially.
    a, b = decode_tokens(codec, _codes(20)), decode_tokens(codec, _codes(20, seed=1))
    assert relative_error(a, b)[0] > 0.1


# --- streaming: agreement with the reference -----------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 25])  # 1 and 3 are smaller than the default hold_back (4)
def test_stream_matches_one_shot(codec, chunk):
    codes = _codes(110)  # not a multiple of 3, 7 or 25: the last push is short
    ref = decode_tokens(codec, codes)
    audio, seams = _stream(codec, codes, chunk)
    assert audio.shape == ref.shape == (110 * HOP,) and audio.dtype == torch.float32
    rms, peak = relative_error(audio, ref)
    assert rms < MAX_REL_ERROR and peak < MAX_REL_ERROR, (rms, peak)
    step = seam_discontinuity(audio, seams, ref)
    assert step.worst < MAX_SEAM_STEP, step


def test_naive_chunking_fails_the_thresholds(codec):
    # The same pushes without context, hold-back or fade: what the thresholds exist to catch.
    codes = _codes(110)
    ref = decode_tokens(codec, codes)
    audio, seams = _stream(codec, codes, 10, left_context=0, hold_back=0, crossfade=0)
    assert audio.shape == ref.shape
    rms, peak = relative_error(audio, ref)
    assert rms > 10 * MAX_REL_ERROR and peak > 100 * MAX_REL_ERROR
    assert seam_discontinuity(audio, seams, ref).mean > 100 * MAX_SEAM_STEP


def test_too_little_hold_back_fails(codec):
    codes = _codes(110)
    ref = decode_tokens(codec, codes)
    audio, seams = _stream(codec, codes, 10, hold_back=2)  # the right edge moves when more frames arrive
    assert seam_discontinuity(audio, seams, ref).mean > 100 * MAX_SEAM_STEP


def test_crossfade_turns_a_mismatch_into_a_ramp(codec, monkeypatch):
    # Make consecutive windows disagree by a DC offset (a stand-in for an LSTM state that has not fully
    # settled): a plain cut shows it as a step, the equal-gain fade as a ramp without overshoot.
    real_decode = codec.decode

    def offset_decode(codes, *args, **kwargs):
        out = real_decode(codes, *args, **kwargs)
        out.audio_values = out.audio_values + 0.05 * (int(codes[..., 0].sum()) % 5)
        return out

    codes = _codes(110)
    ref = decode_tokens(codec, codes)
    monkeypatch.setattr(codec, "decode", offset_decode)
    cut, seams = _stream(codec, codes, 10, crossfade=0)
    faded, seams_faded = _stream(codec, codes, 10, crossfade=160)
    assert seams == seams_faded
    step_cut, step_faded = seam_discontinuity(cut, seams, ref), seam_discontinuity(faded, seams, ref)
    assert step_cut.worst > 0.1
    assert step_faded.worst < step_cut.worst / 50  # a 160-sample sin^2 ramp: ~pi/320 of the step per sample
    # Equal gain never leaves the range of the two estimates; equal power overshoots coherent ones.
    lo, hi = torch.minimum(cut, ref - 0.25) - 1e-6, torch.maximum(cut, ref + 0.25) + 1e-6
    assert bool(((faded >= lo) & (faded <= hi)).all())
    power, _ = _stream(codec, codes, 10, crossfade=160, curve="equal_power")
    assert not bool(((power >= lo) & (power <= hi)).all())


@pytest.mark.parametrize("settings", [
    dict(hold_back=0),  # no lookahead to fade against: plain cuts
    dict(hold_back=1, crossfade=2000),  # fade longer than the lookahead and than a 1-frame segment
    dict(left_context=0, hold_back=7, crossfade=1),
])
def test_output_length_is_exact_for_any_settings(codec, settings):
    audio, _ = _stream(codec, _codes(23), 1, **settings)
    assert audio.shape == (23 * HOP,)
    audio, _ = _stream(codec, _codes(23), 6, **settings)
    assert audio.shape == (23 * HOP,)


def test_short_stream_held_back_entirely_comes_out_at_flush(codec):
    dec = StreamingDecoder(codec, hold_back=4)
    assert dec.push(_codes(3)).numel() == 0
    tail = dec.flush()
    torch.testing.assert_close(tail, decode_tokens(codec, _codes(3)), rtol=0, atol=1e-6)
    assert dec.flush().numel() == 0  # nothing pending after a flush


def test_empty_push_is_a_no_op(codec):
    codes = _codes(40)
    dec = StreamingDecoder(codec)
    out = [dec.push(codes[:, :0]), dec.push(codes[:, :20]), dec.push(codes[:, 20:20]), dec.push(codes[:, 20:])]
    assert out[0].numel() == 0 and out[2].numel() == 0
    assert dec.last_window_frames == 16 + 4 + 20  # the empty push changed nothing: 16 emitted, 4 held
    audio = torch.cat(out + [dec.flush()])
    assert relative_error(audio, decode_tokens(codec, codes))[1] < MAX_REL_ERROR


def test_reset_and_flush_start_a_new_stream(codec):
    codes = _codes(30)
    dec = StreamingDecoder(codec)
    first = torch.cat([dec.push(codes), dec.flush()])
    dec.push(_codes(17, seed=3))
    dec.reset()
    again = torch.cat([dec.push(codes), dec.flush()])
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert dec.frames_in == 0 and dec.samples_out == 0


# --- streaming: cost ---------------------------------------------------------------------------------


def test_window_is_bounded_whatever_the_stream_length(codec, monkeypatch):
    left, hold, chunk = 10, 3, 7
    decoded = []
    real_decode = codec.decode

    def spy(codes, *args, **kwargs):  # what reaches the codec: [1, 1, K, frames]
        decoded.append(codes.shape[-1])
        return real_decode(codes, *args, **kwargs)

    monkeypatch.setattr(codec, "decode", spy)
    dec = StreamingDecoder(codec, left_context=left, hold_back=hold)
    codes = _codes(399)  # 8 s in 57 pushes
    for i in range(0, 399, chunk):
        dec.push(codes[:, i : i + chunk])
        assert dec.last_window_frames == decoded[-1]
        assert dec._frames.shape[1] <= left + hold  # what is kept between pushes
    assert max(decoded) <= left + hold + chunk
    assert decoded[-1] == decoded[len(decoded) // 2] == left + hold + chunk  # steady state, any length



# --- exact streaming decode (the LSTM's state carried) ----------------------------------------------------


def test_musicgen_codecs_stream_exactly(codec):
    assert isinstance(streaming_decoder(codec), ExactStreamingDecoder)
    assert ExactStreamingDecoder(codec).hold_back == 4  # 3 frames for the first conv, 1 for the upsampling


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 25])
def test_exact_stream_equals_one_shot(codec, chunk):
    codes = _codes(113)
    ref = decode_tokens(codec, codes)
    audio, _ = _stream(codec, codes, chunk, exact=True)
    assert audio.shape == ref.shape
    assert max(relative_error(audio, ref)) < EXACT_REL_ERROR


def test_exact_stream_keeps_a_long_lstm_memory_that_the_window_loses(codec):
    """A trained LSTM may remember longer than 25 frames (the windowed decoder's left context). With a forget
    gate held open the windowed decode drifts from the one-shot audio; the carried state does not."""
    import copy

    slow = copy.deepcopy(codec)
    lstm = ExactLayout.of(slow).lstm
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith("bias_ih"):
                bias[lstm.hidden_size : 2 * lstm.hidden_size] = 8.0  # forget gate ~1: the cell keeps everything
    codes = _codes(150)
    ref = decode_tokens(slow, codes)
    windowed, _ = _stream(slow, codes, 5)
    exact, _ = _stream(slow, codes, 5, exact=True)
    assert max(relative_error(windowed, ref)) > 10 * MAX_REL_ERROR
    assert max(relative_error(exact, ref)) < EXACT_REL_ERROR


def test_exact_reach_is_what_the_layers_read(codec):
    """The reaches computed from the layers' shapes equal the influence of one input frame, measured."""
    layout = ExactLayout.of(codec)
    torch.manual_seed(0)
    for layers, reach, per_frame, channels in [
        (layout.before, layout.before_reach, 1, layout.before[0].conv.in_channels),
        (layout.after, layout.after_reach, HOP, layout.lstm.hidden_size),
    ]:
        x = torch.randn(1, channels, 40)
        bumped = x.clone()
        bumped[..., 20] += 1.0
        with torch.no_grad():
            a, b = x, bumped
            for layer in layers:
                a, b = layer(a), layer(b)
        changed = ((a - b).abs().amax(dim=1)[0] > 0).reshape(40, per_frame).any(dim=1).nonzero().flatten()
        # output frame f reads inputs [f - left, f + right]: input 20 moves outputs [20 - right, 20 + left]
        assert (int(changed.min()), int(changed.max())) == (20 - reach.right, 20 + reach.left)


def test_exact_work_per_push_is_bounded(codec):
    layout = ExactLayout.of(codec)
    dec = ExactStreamingDecoder(codec)
    codes = _codes(300)
    for i in range(0, 300, 5):
        dec.push(codes[:, i : i + 5])
        assert dec.last_window_frames <= 5 + layout.before_reach.left + layout.before_reach.right
        assert dec._codes.shape[1] <= layout.before_reach.left + layout.before_reach.right
        assert dec._lstm_out.shape[1] <= layout.after_reach.left + layout.after_reach.right
    assert dec.samples_out == (300 - dec.hold_back) * HOP


def test_exact_short_stream_and_reset(codec):
    dec = ExactStreamingDecoder(codec)
    assert dec.push(_codes(3)).numel() == 0  # nothing final yet: the first conv reads 3 frames ahead
    torch.testing.assert_close(dec.flush(), decode_tokens(codec, _codes(3)), rtol=0, atol=1e-5)
    assert dec.flush().numel() == 0 and dec.frames_in == 0
    first = torch.cat([dec.push(_codes(30)), dec.flush()])
    dec.push(_codes(17, seed=3))
    dec.reset()
    torch.testing.assert_close(torch.cat([dec.push(_codes(30)), dec.flush()]), first, rtol=0, atol=0)


def test_exact_streams_pushed_together_share_calls_and_equal_alone(codec, monkeypatch):
    streams = [_codes(60, seed=s) for s in range(3)]
    alone = [_stream(codec, c, 10, exact=True)[0] for c in streams]
    lstm = ExactLayout.of(codec).lstm
    batches = []
    real = lstm.forward
    monkeypatch.setattr(lstm, "forward", lambda x, *a: (batches.append(x.shape[1]), real(x, *a))[1])
    decoders = [ExactStreamingDecoder(codec) for _ in streams]
    late = ExactStreamingDecoder(codec)  # starts a chunk later: out of step with the others for a while
    pieces = [[] for _ in streams]
    for i in range(0, 60, 10):
        out = push_together([*decoders, late], [c[:, i:i + 10] for c in streams] + [_codes(10 if i else 0, seed=i)])
        for p, o in zip(pieces, out):
            p.append(o)
    # round 1: the three; round 2: the three, then the late one alone; from round 3 on all four in one call
    assert batches == [3, 3, 1, 4, 4, 4, 4]
    for p, d, ref in zip(pieces, decoders, alone):
        torch.testing.assert_close(torch.cat([*p, d.flush()]), ref, rtol=0, atol=1e-5)


def _pushed_together(codec, streams: list[torch.Tensor], stacks: CapturedStacks | None) -> list[torch.Tensor]:
    """Three streams and a late one pushed together in chunks of 7 (groups of 1..4, windows of several lengths)."""
    decoders = [ExactStreamingDecoder(codec, stacks=stacks) for _ in range(len(streams) + 1)]
    late = [_codes(7 if i else 0, seed=100 + i) for i in range(0, 63, 7)]
    pieces = [[] for _ in decoders]
    for n, i in enumerate(range(0, 63, 7)):
        for p, o in zip(pieces, push_together(decoders, [c[:, i:i + 7] for c in streams] + [late[n]])):
            p.append(o)
    return [torch.cat([*p, d.flush()]) for p, d in zip(pieces, decoders)]


def test_traced_codec_stacks_decode_bit_for_bit_what_the_eager_stacks_do(codec):
    """engine.audio.CapturedStacks: one trace per stack serves every window length and group size, each input shape
    checked once; the audio is the eager decoder's to the bit."""
    streams = [_codes(63, seed=s) for s in range(3)]
    stacks = CapturedStacks()
    expected = _pushed_together(codec, streams, None)
    for _ in range(2):  # the second time, every shape is traced and checked: replays only
        replays = stacks.replays
        got = _pushed_together(codec, streams, stacks)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    assert stacks.reason is None and stacks.replays > replays
    shapes = [shape for (_, shape) in stacks._shapes]
    assert len(stacks._traces) == 2 and all(stacks._shapes.values())  # before and after the LSTM, every shape
    assert len({s[0] for s in shapes}) > 1 and len({s[-1] for s in shapes}) > 2  # group sizes, window lengths


def test_a_traced_codec_stack_that_differs_is_dropped_and_said(codec, monkeypatch, caplog):
    """A trace whose numbers move in the last bit is refused for every shape it is checked on: those decode eagerly,
    said once, and the audio is the eager audio."""
    real_trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda fn, args, **kw: real_trace(lambda y: fn(y) * (1 + 1e-6), args, **kw))
    stacks = CapturedStacks()
    with caplog.at_level("WARNING", logger="musicrfm.audio"):
        got = _pushed_together(codec, [_codes(63, seed=s) for s in range(3)], stacks)
    assert stacks.reason is None and stacks.replays == 0 and not any(stacks._shapes.values())
    assert sum("differs from the eager one" in r.getMessage() for r in caplog.records) == 1
    for a, b in zip(got, _pushed_together(codec, [_codes(63, seed=s) for s in range(3)], None)):
        assert torch.equal(a, b)


def test_a_codec_of_unknown_layers_streams_windowed(codec):
    import copy

    odd = copy.deepcopy(codec)
    odd.decoder.layers.insert(0, torch.nn.Tanh())  # a layer whose reach the exact decoder cannot know
    assert ExactLayout.of(odd) is None
    assert isinstance(streaming_decoder(odd), StreamingDecoder)
    with pytest.raises(ValueError, match="windowed"):
        ExactStreamingDecoder(odd)


# --- input checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes, message", [
    (torch.zeros(4, 5), "integer token ids"),
    (torch.zeros(4, 5, dtype=torch.bool), "integer token ids"),
    (torch.zeros(20, dtype=torch.long), r"shape \[K, n\]"),
    (torch.zeros(1, 4, 5, dtype=torch.long), r"shape \[K, n\]"),
    (torch.zeros(8, 5, dtype=torch.long), "8 codebooks"),
    (torch.full((4, 5), 64), r"\[0, 64\).*pad/BOS"),
    (torch.full((4, 5), -1), r"\[0, 64\)"),
])
@pytest.mark.parametrize("kind", [StreamingDecoder, ExactStreamingDecoder])
def test_push_rejects_bad_codes(codec, codes, message, kind):
    with pytest.raises(ValueError, match=message):
        kind(codec).push(codes)


def test_decode_tokens_rejects_bad_codes(codec):
    with pytest.raises(ValueError, match=r"\[K, T\] or \[B, K, T\]"):
        decode_tokens(codec, torch.zeros(1, 1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        decode_tokens(codec, torch.full((2, 4, 5), 99))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decode_tokens(codec, [[1, 2, 3]])


@pytest.mark.parametrize("kind", [StreamingDecoder, ExactStreamingDecoder])
def test_codebook_count_cannot_change_mid_stream(codec, kind):
    dec = kind(codec)
    dec.push(_codes(2))
    with pytest.raises(ValueError, match="stream has 4 codebooks"):
        dec.push(_codes(2)[:3])


@pytest.mark.parametrize("kwargs", [dict(left_context=-1), dict(hold_back=1.5), dict(crossfade=True),
                                    dict(curve="linear")])
def test_settings_are_checked(codec, kwargs):
    with pytest.raises(ValueError):
        StreamingDecoder(codec, **kwargs)


# --- a codec with encodec_32khz's architecture -----------------------------------------------------------


def test_random_small_codec_streams_within_threshold():
    # encodec_32khz's layout (2-layer LSTM of 1024 units, 64 filters, 2048-entry codebooks), random
    # weights; only the codec is built, which is much faster than load_model("random-small").
    from transformers import EncodecModel

    from musicrfm.engine.model import random_model_config, seed_codebooks

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        codec = EncodecModel(random_model_config("random-small").audio_encoder).eval()
    seed_codebooks(codec, 0)
    codes = _codes(60, vocab=2048)
    ref = decode_tokens(codec, codes)
    audio, seams = _stream(codec, codes, 20)
    assert audio.shape == (60 * HOP,)
    assert max(relative_error(audio, ref)) < MAX_REL_ERROR
    assert seam_discontinuity(audio, seams, ref).worst < MAX_SEAM_STEP
    exact, _ = _stream(codec, codes, 5, exact=True)
    assert max(relative_error(exact, ref)) < EXACT_REL_ERROR


# --- WAV files ---------------------------------------------------------------------------------------


def test_wav_round_trip(tmp_path):
    path = tmp_path / "a.wav"
    t = torch.linspace(0, 1, 3200)
    audio = 0.8 * torch.sin(2 * torch.pi * 440 * t)
    audio[:3] = torch.tensor([1.5, -2.0, 1.0])  # out of range: clipped
    write_wav(path, audio, 32000)
    back, rate = read_wav(path)
    assert rate == 32000 and back.dtype == np.float32 and back.shape == (3200,)
    expected = audio.clamp(-1, 1).numpy()
    assert np.abs(back - expected).max() < 1e-4
    write_wav(path, expected.astype(np.float64), 16000)  # numpy input works as well
    assert read_wav(path)[1] == 16000


def test_stereo_wav_reads_as_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    frames = np.array([[16384, -16384], [32767, 32767]], dtype="<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(44100)
        f.writeframes(frames.tobytes())
    audio, rate = read_wav(path)
    assert rate == 44100
    np.testing.assert_allclose(audio, [0.0, 32767 / 32768], atol=1e-7)


@pytest.mark.parametrize("audio, message", [
    (np.array([0.1, np.nan, 0.2]), "1 NaN or infinite"),
    (np.array([0.1, np.inf]), "NaN or infinite"),
    (np.zeros((2, 10)), "mono"),
    (np.zeros(10, dtype=np.int16), "floating point"),
])
def test_write_wav_rejects_bad_audio(tmp_path, audio, message):
    path = tmp_path / "bad.wav"
    with pytest.raises(ValueError, match=message):
        write_wav(path, audio, 32000)
    assert not path.exists()


def test_corrupt_or_unsupported_wav_is_a_value_error(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(ValueError, match="garbage.wav"):
        read_wav(garbage)

    good = tmp_path / "good.wav"
    write_wav(good, np.zeros(1000, dtype=np.float32), 32000)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(ValueError, match="truncated.wav.*truncated"):
        read_wav(truncated)
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match="header.wav"):
        read_wav(header_only)

    wide = tmp_path / "24bit.wav"
    with wave.open(str(wide), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(3)
        f.setframerate(48000)
        f.writeframes(b"\x00" * 30)
    with pytest.raises(ValueError, match="24bit.wav.*16-bit"):
        read_wav(wide)


def test_streams_pushed_together_decode_in_one_call_to_what_each_decodes_alone(codec, monkeypatch):
    """push_together: the windows of equal length on one codec go through EnCodec in one batched call, and each
    stream gets the audio it gets pushing alone (to float round-off)."""
    streams = [_codes(60, seed=s) for s in range(3)]
    alone = [_stream(codec, c, 10)[0] for c in streams]
    calls = []
    real = codec.decode
    monkeypatch.setattr(codec, "decode", lambda codes, *a, **k: (calls.append(codes.shape[1]), real(codes, *a, **k))[1])
    decoders = [StreamingDecoder(codec) for _ in streams]
    late = StreamingDecoder(codec)  # a stream that starts a chunk later: its window is shorter for a while
    pieces = [[] for _ in streams]
    for i in range(0, 60, 10):
        out = push_together([*decoders, late], [c[:, i:i + 10] for c in streams] + [_codes(10 if i else 0, seed=i)])
        for p, o in zip(pieces, out):
            p.append(o)
    # Until the late stream's left context is as full as the others' (25 frames), it decodes apart.
    assert calls == [3, 3, 1, 3, 1, 3, 1, 4, 4]
    for p, d, ref in zip(pieces, decoders, alone):
        together = torch.cat([*p, d.flush()])
        assert together.shape == ref.shape
        torch.testing.assert_close(together, ref, rtol=0, atol=1e-5)
