"""Feature extraction: the states generation produces, pooled over valid frames, stored resumably."""

import numpy as np
import pytest
import torch

from musicrfm.engine.audio import read_wav, write_wav
from musicrfm.probes.extract import (ExtractionSettings, FeatureError, decoder_features, encode_audio, extract_concept,
                            load_features)


def _delayed_by_hand(codes, pad):
    """BOS + delay pattern written out plainly: position p, codebook k holds frame p - k - 1."""
    b, k, f = codes.shape
    out = torch.full((b, k, f + 1), pad)
    for p in range(f + 1):
        for c in range(k):
            if 0 <= p - c - 1 < f:
                out[:, c, p] = codes[:, c, p - c - 1]
    return out


def test_features_are_the_transformers_hidden_states_under_the_delay_pattern(tiny):
    codes = torch.randint(0, 64, (2, 4, 10), generator=torch.Generator().manual_seed(0))
    feats = decoder_features(tiny, codes, prompt="piano")
    inputs = tiny.tokenizer(["piano"] * 2, return_tensors="pt")
    ids = _delayed_by_hand(codes, tiny.pad_token_id)
    ref = tiny.hf(**inputs, decoder_input_ids=ids.reshape(8, -1), output_hidden_states=True)
    for layer in range(tiny.num_layers - 1):  # transformers' last entry is after the final norm
        h = ref.decoder_hidden_states[layer + 1]  # [2, 11, d]
        torch.testing.assert_close(feats["mean"][:, layer], h[:, 1:].mean(1))
        torch.testing.assert_close(feats["last"][:, layer], h[:, -1])


def test_shorter_clips_in_a_batch_pool_only_their_own_frames(tiny):
    codes = torch.randint(0, 64, (2, 4, 12), generator=torch.Generator().manual_seed(1))
    batch = decoder_features(tiny, codes, frames=torch.tensor([12, 7]))
    alone = decoder_features(tiny, codes[1:, :, :7])
    for pooling in ("mean", "last"):
        torch.testing.assert_close(batch[pooling][1], alone[pooling][0], rtol=1e-4, atol=1e-5)


def _tone(freq, seconds=1.0, rate=32000):
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_extract_store_resume_and_refuse_to_mix(tiny, tmp_path):
    clips, labels = [], []
    for i, (name, f) in enumerate([("A", 220.0), ("E", 329.6)] * 3):
        path = tmp_path / "audio" / f"{name}{i}.wav"
        path.parent.mkdir(exist_ok=True)
        write_wav(path, _tone(f, seconds=0.5 + 0.1 * i), 32000)
        clips.append(path)
        labels.append(name)
    load = lambda p, rate: read_wav(p)[0]  # noqa: E731
    settings = ExtractionSettings(batch_size=2, shard_size=4)
    folder = extract_concept(tiny, "notes", clips, labels, tmp_path / "feat", settings=settings,
                             classes=["A", "E"], load_audio=load, progress=False)
    fs = load_features(folder, tiny.fingerprint)
    assert fs.features["mean"].shape == (6, tiny.num_layers, tiny.hidden_size)
    assert fs.features["mean"].dtype == torch.float16 and fs.classes == ["A", "E"] and fs.labels == labels
    # One clip alone gives the same features as inside its batch and shard.
    audio = torch.from_numpy(read_wav(clips[3])[0])[None]
    alone = decoder_features(tiny, encode_audio(tiny, audio))
    torch.testing.assert_close(fs.features["mean"][3].float(), alone["mean"][0], rtol=2e-3, atol=2e-3)

    # Resume: a deleted shard is recomputed, the other is kept untouched.
    kept = (folder / "part-00000.safetensors").stat().st_mtime_ns
    (folder / "part-00001.safetensors").unlink()
    extract_concept(tiny, "notes", clips, labels, tmp_path / "feat", settings=settings, classes=["A", "E"],
                    load_audio=load, progress=False)
    assert (folder / "part-00000.safetensors").stat().st_mtime_ns == kept
    assert torch.equal(load_features(folder).features["mean"], fs.features["mean"])

    # Layer subsets load for training sharded by layer.
    sub = load_features(folder, layers=[2, 0], poolings=["mean"])
    assert torch.equal(sub.features["mean"][:, 0], fs.features["mean"][:, 2])

    with pytest.raises(FeatureError, match="prompt"):
        extract_concept(tiny, "notes", clips, labels, tmp_path / "feat", settings=ExtractionSettings(prompt="x"),
                        load_audio=load, progress=False)
    from musicrfm.engine.model import ModelFingerprint
    with pytest.raises(FeatureError, match="48 layers"):
        load_features(folder, ModelFingerprint("musicgen", 48, 2048))
    (folder / "part-00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(FeatureError, match="part-00001"):
        load_features(folder)


def test_extraction_keeps_the_typical_norm_of_every_layer(tiny, tmp_path):
    """The shards' |h| statistics are the mean and spread of the per-token norm over every clip's valid
    positions, as a direct pass computes them; they become the bank's LayerNorms (relative strength)."""
    from musicrfm.probes.extract import load_layer_norms

    clips = []
    for i, f in enumerate((220.0, 330.0, 440.0)):
        path = tmp_path / "audio" / f"t{i}.wav"
        path.parent.mkdir(exist_ok=True)
        write_wav(path, _tone(f, seconds=0.4 + 0.2 * i), 32000)
        clips.append(path)
    load = lambda p, rate: read_wav(p)[0]  # noqa: E731
    folder = extract_concept(tiny, "notes", clips, ["A", "E", "A"], tmp_path / "feat",
                             settings=ExtractionSettings(batch_size=2, shard_size=2), classes=["A", "E"],
                             load_audio=load, progress=False)
    norms = load_layer_norms(folder, tiny.num_layers)
    per_layer: list[list[float]] = [[] for _ in range(tiny.num_layers)]
    for clip in clips:  # one clip at a time: positions 1..F only
        codes = encode_audio(tiny, torch.from_numpy(read_wav(clip)[0])[None])
        from musicrfm.engine.norms import read_activations

        read_activations(tiny, codes, "", lambda i, h: per_layer[i].extend(h[0, 1:].norm(dim=-1).tolist()))
    for layer, values in enumerate(per_layer):
        assert norms.mean[layer] == pytest.approx(float(np.mean(values)), rel=1e-3)
        assert norms.std[layer] == pytest.approx(float(np.std(values)), rel=1e-2, abs=1e-3)
    assert norms.tokens == len(per_layer[0]) and norms.source.startswith("extraction: ")
    assert load_layer_norms(folder, tiny.num_layers + 1) is None  # features of only some layers: none


def test_attention_site_features_are_read_where_attention_steering_writes(tiny, tmp_path):
    """--site attention: the pooled features are the decoder's own capture of the self-attention output, and that
    point is where attention-site steering adds its vector (a vector added at layer l shows up there exactly)."""
    from musicrfm.engine.decoder import MusicgenDecoder, delayed_inputs

    codes = torch.randint(0, 64, (1, tiny.num_codebooks, 6), generator=torch.Generator().manual_seed(2))
    feats = decoder_features(tiny, codes, site="attention")
    residual = decoder_features(tiny, codes)
    v = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(3))

    class AddAtLayer1:
        site, rows = "attention", "both"

        def steer(self, layer, h):
            return h + v if layer == 1 else h

    def captured(steering):
        seen = {}
        dec = MusicgenDecoder(tiny, rows=1, capacity=7)
        dec.set_conditioning(dec.encode_text([""], guidance=False))
        dec.forward(delayed_inputs(codes, 0, 6, tiny.pad_token_id), steering=steering,
                    capture=lambda i, h: seen.setdefault(i, h.clone()), capture_site="attention")
        return seen

    plain, steered = captured(None), captured(AddAtLayer1())
    for layer in range(tiny.num_layers):
        torch.testing.assert_close(feats["mean"][0, layer], plain[layer][0, 1:].mean(0))
        assert not torch.allclose(feats["mean"][0, layer], residual["mean"][0, layer])
    torch.testing.assert_close(plain[0], steered[0])  # before the steered layer: untouched
    torch.testing.assert_close(steered[1] - plain[1], v.expand_as(plain[1]), rtol=1e-4, atol=1e-4)

    # The site is recorded, checked on resume (never mixed) and carried by load_features.
    path = tmp_path / "a.wav"
    write_wav(path, _tone(220.0, seconds=0.3), 32000)
    load = lambda p, rate: read_wav(p)[0]  # noqa: E731
    folder = extract_concept(tiny, "notes", [path, path], ["A", "E"], tmp_path / "feat",
                             settings=ExtractionSettings(site="attention"), load_audio=load, progress=False)
    assert load_features(folder).site == "attention"
    with pytest.raises(FeatureError, match="injection_point = 'attention', this run would write 'residual'"):
        extract_concept(tiny, "notes", [path, path], ["A", "E"], tmp_path / "feat", load_audio=load, progress=False)
    with pytest.raises(ValueError, match="site must be one of residual, attention"):
        ExtractionSettings(site="mlp")
