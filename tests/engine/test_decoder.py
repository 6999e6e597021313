"""The decoder's forward pass: same numbers as transformers, the injection point where the docs say."""

import torch

from musicrfm.engine.decoder import MusicgenDecoder, delayed_inputs, frame_at
from musicrfm.protocol.wire import end_step


def _codes(tiny, t, seed=0):
    codes = torch.randint(0, 64, (1, tiny.num_codebooks, t), generator=torch.Generator().manual_seed(seed))
    codes[:, :, 0] = tiny.pad_token_id  # BOS
    return codes


def test_logits_and_residual_stream_match_transformers(tiny):
    codes = _codes(tiny, 9)
    inputs = tiny.tokenizer(["soft strings"], return_tensors="pt")
    ref = tiny.hf(**inputs, decoder_input_ids=codes.reshape(tiny.num_codebooks, -1), output_hidden_states=True)
    dec = MusicgenDecoder(tiny, rows=1, capacity=16)
    dec.set_conditioning(dec.encode_text(["soft strings"], guidance=False))
    seen = {}
    logits = dec.forward(codes, capture=lambda i, h: seen.__setitem__(i, h), all_logits=True)
    torch.testing.assert_close(logits, ref.logits.reshape(1, tiny.num_codebooks, 9, -1))
    hs = ref.decoder_hidden_states  # embeddings, blocks 0..L-2, then the last block AFTER the final norm
    last = tiny.num_layers - 1
    for layer in range(last):
        torch.testing.assert_close(seen[layer], hs[layer + 1])
    # The injection point of the last block is before the final LayerNorm (the reference code probed
    # after it and steered before it).
    assert not torch.allclose(seen[last], hs[last + 1])
    torch.testing.assert_close(dec.final_norm(seen[last]), hs[last + 1])


def test_block_prefill_equals_one_position_at_a_time(tiny):
    codes = _codes(tiny, 12, seed=1)
    a = MusicgenDecoder(tiny, rows=2, capacity=16)
    b = MusicgenDecoder(tiny, rows=2, capacity=16)
    for d in (a, b):
        d.set_conditioning(d.encode_text(["bells"], guidance=True))
    one_by_one = torch.stack([a.forward(codes[:, :, t:t + 1]) for t in range(12)], dim=2)
    # Two blocks, the second starting mid-cache: exercises the offset causal mask.
    blocks = torch.cat([b.forward(codes[:, :, :5], all_logits=True), b.forward(codes[:, :, 5:], all_logits=True)],
                       dim=2)
    torch.testing.assert_close(blocks, one_by_one, rtol=1e-4, atol=1e-5)


def test_unconditional_rows_ignore_the_text(tiny):
    dec = MusicgenDecoder(tiny, rows=2, capacity=4)
    codes = _codes(tiny, 1)
    dec.set_conditioning(dec.encode_text(["harp"], guidance=True))
    a = dec.forward(codes)
    dec.reset()
    dec.set_conditioning(dec.encode_text(["distorted bass and shouting"], guidance=True))
    b = dec.forward(codes)
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_the_delay_pattern_has_one_definition_the_protocols_end_step_agrees_with():
    """Position p carries codebook k of frame p - k - 1; a stream of F frames is complete once position
    end_step(F, K) is fed, the one at which its last codebook of its last frame is known."""
    k, frames = 4, 9
    assert frame_at(10, 0) == 9 and frame_at(10, 3) == 6
    assert frame_at(end_step(frames, k), k - 1) == frames - 1
    assert frame_at(end_step(frames, k) - 1, k - 1) == frames - 2  # a step earlier, that frame is not complete
    codes = torch.arange(k * 2 * frames).reshape(1, k, 2 * frames)  # frames past the end are read as padding
    inputs = delayed_inputs(codes, 0, end_step(frames, k), pad_id=-1, end=frames)
    for p in range(end_step(frames, k) + 1):
        for c in range(k):
            f = frame_at(p, c)
            assert inputs[0, c, p] == (codes[0, c, f] if 0 <= f < frames else -1)
