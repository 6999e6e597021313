"""musicgen-mini's training code (mini/), on tiny settings: the corpus, the codec's residual-VQ
training, the language model's training forward (it must be the engine's forward), resuming, export."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from musicrfm.engine.decoder import MusicgenDecoder
from musicrfm.engine.model import MusicModel, load_model
from musicrfm.mini.codec import CodecSettings, ResidualVQTrainer, build_codec, train_codec
from musicrfm.mini.corpus import CorpusSettings, load_corpus, plan_corpus, render_corpus
from musicrfm.mini.lm import (IGNORE, LMSettings, build_mini, build_tokenizer, export_mini, text_states,
                            train_lm, training_batch)
from musicrfm.probes.syntheory import CHORD_TYPES, PITCH_NAMES, SoundfontNotFoundError

SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
needs_soundfont = pytest.mark.skipif(not os.path.isfile(SOUNDFONT), reason="TimGM6mb soundfont not installed")

TINY_CORPUS = CorpusSettings(programs=(0, 40), note_octaves=(4,), chords=4, intervals=4, validation=0.25)
TINY_CODEC = CodecSettings(num_filters=4, hidden_size=8, codebook_size=16, segment_seconds=0.3, batch_size=2,
                           warmup_steps=2, dead_after=1)
TINY_LM = LMSettings(layers=2, hidden=32, heads=4, ffn=64, text_dim=16, text_layers=1, text_heads=2, text_ffn=32,
                     max_positions=64, frames=20, batch_size=2, warmup_steps=1, dropout=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not os.path.isfile(SOUNDFONT):
        pytest.skip("TimGM6mb soundfont not installed")
    return render_corpus(tmp_path_factory.mktemp("corpus"), TINY_CORPUS, workers=1, progress=False)


def test_captions_name_family_and_register_never_pitch_or_quality():
    plan = plan_corpus(CorpusSettings())
    assert len(plan) == 92 * 60 + 2500 + 1500
    forbidden = {n.lower() for n in PITCH_NAMES} | {c.lower() for c in CHORD_TYPES} | {
        "major", "minor", "aug", "dim", "sharp", "flat", *map(str, range(10))}
    captions = {clip.caption for _, clip in plan}
    for caption in captions:
        words = set(caption.replace(",", " ").split())
        assert not words & forbidden, caption
        assert caption.endswith(("low register", "middle register", "high register")), caption
    # 13 families x 3 kinds, each heard in more than one register
    assert len({c.split(",")[0] for c in captions}) == 13 * 3
    # the unsteered target is a caption: every pitch class appears under each note caption about equally
    notes = [clip for _, clip in plan if clip.concept == "notes"]
    by_caption: dict[str, np.ndarray] = {}
    for clip in notes:
        by_caption.setdefault(clip.caption, np.zeros(12))[clip.pitch_class] += 1
    for counts in by_caption.values():
        assert counts.min() > 0 and counts.max() <= 2 * counts.min(), counts


def test_held_out_split_is_stable_and_sized():
    a = [c for _, c in plan_corpus(CorpusSettings())]
    b = [c for _, c in plan_corpus(CorpusSettings(seed=0))]
    assert [c.validation for c in a] == [c.validation for c in b]
    share = np.mean([c.validation for c in a])
    assert 0.04 < share < 0.06


@needs_soundfont
def test_corpus_renders_resumes_and_refuses_other_settings(corpus, tmp_path):
    clips = len(plan_corpus(TINY_CORPUS))
    assert corpus.audio.shape == (clips, 64_000) and corpus.audio.dtype == np.int16
    assert all(np.abs(corpus.audio[i]).max() > 10_000 for i in range(clips))  # peak-normalised, not silent
    shard = next(corpus.folder.glob("audio-*.npy"))
    before = shard.stat().st_mtime_ns
    again = render_corpus(corpus.folder, TINY_CORPUS, workers=1, progress=False)  # nothing left to render
    assert shard.stat().st_mtime_ns == before and np.array_equal(again.audio, corpus.audio)
    with pytest.raises(ValueError, match="other settings"):
        render_corpus(corpus.folder, replace(TINY_CORPUS, seed=1), workers=1, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "corpus.json").write_text((corpus.folder / "corpus.json").read_text())
    with pytest.raises(ValueError, match="0 of 1 audio shards"):
        load_corpus(broken)
    with pytest.raises(FileNotFoundError, match="musicrfm mini corpus"):
        load_corpus(tmp_path)
    with pytest.raises(SoundfontNotFoundError, match="timgm6mb"):
        render_corpus(tmp_path / "x", replace(TINY_CORPUS, soundfont=str(tmp_path / "none.sf2")), workers=1,
                      progress=False)


def test_residual_vq_training_writes_the_buffers_hf_encode_uses():
    torch.manual_seed(0)
    frozen = replace(TINY_CODEC, ema_decay=1.0, dead_after=10**9)  # no codebook updates: compare like with like
    codec = build_codec(frozen)
    vq = ResidualVQTrainer(codec, frozen)
    z = torch.randn(3, frozen.hidden_size, 50)
    _, commit, used = vq(z, step=0, n_q=frozen.codebooks)  # fits the codebooks on these latents
    assert all(bool(layer.codebook.inited) for layer in codec.quantizer.layers)
    assert len(used) == frozen.codebooks and all(u > 1 for u in used) and commit.item() > 0
    zr = z.clone().requires_grad_(True)
    out, _, _ = vq(zr, step=1, n_q=frozen.codebooks)
    codes = codec.quantizer.encode(z, bandwidth=frozen.bandwidth_kbps)  # transformers' own argmin over our buffers
    assert codes.shape == (frozen.codebooks, 3, 50)
    torch.testing.assert_close(out.detach(), codec.quantizer.decode(codes))
    out.sum().backward()  # straight-through: the decoder's gradient reaches the encoder unchanged
    torch.testing.assert_close(zr.grad, torch.ones_like(zr))
    # with updates on, a code left unused for `dead_after` steps is moved onto a live latent
    live = build_codec(TINY_CODEC)
    trainer = ResidualVQTrainer(live, TINY_CODEC)
    trainer(z, step=0, n_q=1)
    before = live.quantizer.layers[0].codebook.embed.clone()
    trainer(z[:, :, :2], step=5, n_q=1)  # 6 latents cannot use all 16 codes
    moved = (live.quantizer.layers[0].codebook.embed != before).any(1)
    assert moved.sum() >= 16 - 6


@needs_soundfont
def test_codec_training_resumes_to_the_same_weights(corpus, tmp_path):
    straight = train_codec(corpus, tmp_path / "a", TINY_CODEC, steps=4, eval_every=1e9, eval_clip_count=1,
                           progress=False)
    train_codec(corpus, tmp_path / "b", TINY_CODEC, steps=2, eval_every=1e9, eval_clip_count=1, progress=False)
    resumed = train_codec(corpus, tmp_path / "b", TINY_CODEC, steps=4, eval_every=1e9, eval_clip_count=1,
                          progress=False)
    assert straight["step"] == resumed["step"] == 4
    a = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert a["evals"][-1]["quantized"] and 0 <= a["evals"][-1]["agreement"] <= 1
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / x / "checkpoint" / "weights.safetensors")) for x in "ab")
    assert wa.keys() == wb.keys()
    for key in wa:  # weights, optimizer moments and codebooks (restarts included)
        torch.testing.assert_close(wa[key], wb[key], msg=key)
    with pytest.raises(ValueError, match="other settings"):
        train_codec(corpus, tmp_path / "b", replace(TINY_CODEC, lr=0.1), steps=5, progress=False)


def _tiny_mini():
    codec = build_codec(TINY_CODEC)
    tok = build_tokenizer(["piano note, low register", "guitar chord, high register"])
    return build_mini(codec, tok, TINY_LM).eval(), tok


def test_tokenizer_is_word_level_with_t5_specials():
    tok = build_tokenizer(["guitar note, low register", "synth pad chord, high register"])
    ids = tok(["Guitar NOTE, low register", "a warm piano", ""])["input_ids"]
    assert ids[0][-1] == 1 and len(ids[0]) == 6  # guitar note , low register </s>
    assert ids[1] == [2, 2, 2, 1]  # unknown words -> <unk>
    assert ids[2] == [1]


def test_training_batch_follows_the_engines_delay_pattern():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (4, 4, 25)).astype(np.int16)
    captions = ["a"] * 4
    inputs, targets, texts = training_batch(codes, captions, np.array([0, 1]), {"a": np.arange(4)}, TINY_LM, rng, 16)
    k, t = 4, TINY_LM.frames
    assert inputs.shape == targets.shape == (2, k, t + k - 1)
    for c in range(k):
        assert (inputs[:, c, : c + 1] == 16).all()  # BOS until codebook c's first frame
        assert (targets[:, c, :c] == IGNORE).all() and (targets[:, c, c:c + t] != IGNORE).all()
        assert (targets[:, c, c + t:] == IGNORE).all()
        # the target at position p is the input at position p + 1
        torch.testing.assert_close(targets[:, c, c:c + t - 1], inputs[:, c, c + 1:c + t])


def test_training_forward_is_the_engines_forward():
    model, tok = _tiny_mini()
    mm = MusicModel("t", model, tok, torch.device("cpu"), torch.float32, False)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (2, 4, 25)).astype(np.int16)
    inputs, _, _ = training_batch(codes, ["x", "x"], np.array([0, 1]), {"x": np.arange(2)}, TINY_LM, rng, 16)
    states, mask = text_states(model, tok, ["piano note, low register", None])
    b, k, t = inputs.shape
    with torch.no_grad():
        trained = model.decoder(input_ids=inputs.reshape(b * k, t), encoder_hidden_states=states,
                                encoder_attention_mask=mask).logits.reshape(b, k, t, -1)
    for row in range(2):  # row 0 conditioned, row 1 the unconditional (dropped caption) row
        dec = MusicgenDecoder(mm, rows=2, capacity=TINY_LM.max_positions)
        dec.set_conditioning(dec.encode_text(["piano note, low register"], guidance=True))
        engine = dec.forward(inputs[row : row + 1], all_logits=True)[row]
        torch.testing.assert_close(engine, trained[row], atol=1e-5, rtol=1e-5)


@needs_soundfont
def test_lm_trains_resumes_and_exports_a_loadable_model(corpus, tmp_path):
    codec = build_codec(TINY_CODEC)
    from musicrfm.mini.lm import encode_corpus

    codes = encode_corpus(codec, corpus, progress=False)
    assert codes.shape == (len(corpus.clips), 4, 200) and codes.dtype == np.int16
    first = train_lm(corpus, codec, codes, tmp_path / "lm", TINY_LM, steps=3, eval_every=1e9, progress=False)
    assert first["state"]["step"] == 3 and first["state"]["evals"][-1]["held_out_loss"] > 0
    out = train_lm(corpus, codec, codes, tmp_path / "lm", TINY_LM, steps=5, eval_every=1e9, progress=False)
    assert out["state"]["step"] == 5 and len(out["state"]["evals"]) == 2
    size = export_mini(out["model"], out["tokenizer"], tmp_path / "export", {"name": "test"})
    assert size < 2_000_000
    model = load_model(str(tmp_path / "export"))
    assert model.sample_rate == 16_000 and model.frame_rate == 50 and not model.is_random
    assert model.tokenizer("piano note, low register")["input_ids"] == out["tokenizer"]("piano note, low register")[
        "input_ids"]
    from musicrfm.engine.generation import generate

    audio = generate(model, "piano note, low register", 1.0, seed=0, progress=False).audio
    assert audio.shape == (16_000,) and np.isfinite(audio).all()


@pytest.mark.parametrize("args, message", [
    (["codec", "--minutes", "1"], "musicrfm mini corpus --work"),
    (["codec"], "give --minutes"),
    (["lm", "--steps", "3"], "has no corpus.json"),
    (["export"], "has no corpus.json"),
])
def test_mini_commands_name_what_is_missing(tmp_path, args, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "musicrfm", "mini", args[0], "--work", str(tmp_path), *args[1:]],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
