"""The decode loop against transformers' `generate`, and its own guarantees (determinism, long streams)."""

import pytest
import torch

from musicrfm.engine.decoder import MusicgenDecoder
from musicrfm.engine.loop import Generator
from musicrfm.engine.sampling import SamplingConfig

GREEDY = SamplingConfig(greedy=True)


@pytest.mark.parametrize("prompt", ["warm lofi piano with soft drums", "", "a"])
def test_greedy_matches_transformers_generate(tiny, hf_codes, prompt):
    new_tokens = 60
    ref = hf_codes(prompt, new_tokens, do_sample=False, guidance_scale=3.0)
    # generate() pads the delay pattern at the end: new_tokens + 1 - K complete frames.
    gen = Generator(tiny, prompt, sampling=GREEDY, total_frames=new_tokens + 1 - tiny.num_codebooks)
    while not gen.finished:
        gen.advance()
    assert gen.codes().shape == ref.shape
    assert torch.equal(gen.codes(), ref)


def test_greedy_without_guidance_matches_transformers(tiny, hf_codes):
    ref = hf_codes("bass", 30, do_sample=False, guidance_scale=1.0)
    gen = Generator(tiny, "bass", sampling=SamplingConfig(greedy=True, guidance_scale=1.0), total_frames=27)
    gen.run(10_000)
    assert gen.engine.rows_per_slot == 1  # no unconditional rows computed at scale 1
    assert torch.equal(gen.codes(), ref)


def test_audio_prompt_matches_transformers(tiny, hf_codes):
    """The prompt layout (BOS for codebooks whose frames precede the prompt) is the one re-prompting uses."""
    prompt_codes = torch.randint(0, 64, (tiny.num_codebooks, 12), generator=torch.Generator().manual_seed(3))
    ref = hf_codes("drums", 20, do_sample=False, guidance_scale=3.0,
                   decoder_input_ids=prompt_codes.reshape(tiny.num_codebooks, -1))
    gen = Generator(tiny, "drums", sampling=GREEDY, audio_prompt=prompt_codes, total_frames=ref.shape[1])
    gen.run(10_000)
    assert torch.equal(gen.codes(), ref)


def test_same_seed_same_tokens_and_chunking_does_not_matter(tiny):
    sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)

    def tokens(seed, chunk):
        gen = Generator(tiny, "piano", sampling=sampling, seed=seed, total_frames=40)
        while not gen.finished:
            gen.chunk(chunk)
        return gen.codes()

    a = tokens(7, 1)
    assert torch.equal(a, tokens(7, 5))
    assert torch.equal(a, tokens(7, 64))
    assert not torch.equal(a, tokens(8, 5))


def test_chunks_tile_the_stream(tiny):
    gen = Generator(tiny, "x", seed=1)
    chunks = [gen.chunk(7) for _ in range(6)]
    assert chunks[0].first_frame == 0
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.first_frame == prev.first_frame + prev.num_frames
        assert nxt.steps[0] == prev.steps[1]
    got = torch.cat([c.codes for c in chunks], dim=1)
    assert torch.equal(got, gen.codes())
    assert got.shape[1] == 6 * 7 - (tiny.num_codebooks - 1)  # a frame completes K - 1 steps after it starts


def test_stream_runs_past_three_context_lengths(tiny, monkeypatch):
    """Re-prompting keeps every step producing one new frame: no gap, no repeated or dropped frames."""
    context, keep = 32, 12
    resets = []
    gen = Generator(tiny, "organ", seed=3, context_steps=context, keep_steps=keep)
    reset = gen.decoder.reset
    monkeypatch.setattr(gen.decoder, "reset", lambda rows=None: (resets.append(gen.step), reset(rows))[1])
    total = 0
    for _ in range(40):
        chunk = gen.chunk(5)
        assert chunk.first_frame == total
        total += chunk.num_frames
    assert gen.step == 200 and total == 200 - (tiny.num_codebooks - 1)
    assert total > 3 * context
    assert len(resets) >= 8
    assert resets[0] == context and all(b - a == context - keep for a, b in zip(resets, resets[1:]))
    codes = gen.codes()
    assert codes.min() >= 0 and codes.max() < 64  # never a BOS/pad id inside the audio
    # The same stream with another chunking gives the same tokens across every re-prompt.
    again = Generator(tiny, "organ", seed=3, context_steps=context, keep_steps=keep)
    again.run(200)
    assert torch.equal(again.codes(), codes)


def test_reprompt_refill_equals_feeding_the_window_step_by_step(tiny):
    """After a re-prompt the cache holds the window exactly as if it had been fed one position at a time."""
    gen = Generator(tiny, "flute", sampling=GREEDY, context_steps=24, keep_steps=10)
    gen.run(24)  # cache full: the next step re-prompts
    first = gen.step - gen.keep_steps
    gen._offset = first  # the window the re-prompt will use
    window = gen._inputs(first, gen.step)
    gen._offset = 0
    gen.advance()
    fresh = MusicgenDecoder(tiny, rows=2, capacity=24)
    fresh.set_conditioning(fresh.encode_text(["flute"], guidance=True))
    for t in range(window.shape[2]):
        logits = fresh.forward(window[:, :, t:t + 1])
    gen2 = Generator(tiny, "flute", sampling=GREEDY, context_steps=24, keep_steps=10)
    gen2.run(24)
    gen2._prepare()  # re-prompts: the cache is empty, the next feed is the whole window
    assert gen2._feed_start() == first
    batched = gen2._feed_alone()
    torch.testing.assert_close(batched, logits, rtol=1e-4, atol=1e-5)
    # BOS wherever a codebook's frame falls before the window.
    assert (window[0, 1:, 0] == tiny.pad_token_id).all() and (window[0, 3, :3] == tiny.pad_token_id).all()


def test_prompt_change_keeps_the_stream(tiny):
    gen = Generator(tiny, "piano", seed=0)
    before = gen.chunk(20)
    gen.set_prompt("heavy metal guitar")
    after = gen.chunk(20)
    assert after.first_frame == before.first_frame + before.num_frames and after.num_frames == 20
    assert gen.decoder.lengths[gen.rows.start] == 40  # the audio context was kept


def test_bad_settings_are_rejected(tiny):
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="keep_steps"):
        Generator(tiny, "", context_steps=10, keep_steps=10)
    with pytest.raises(ValueError, match="audio prompt"):
        Generator(tiny, "", audio_prompt=torch.full((4, 3), 99))
    gen = Generator(tiny, "", sampling=SamplingConfig(guidance_scale=1.0))
    with pytest.raises(ValueError, match="without guidance"):
        gen.set_sampling(SamplingConfig(guidance_scale=3.0))
