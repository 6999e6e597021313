"""`musicrfm mini check`: the bundled model's own health checks, what musicgen-mini must do, measured with
the independent pitch check (musicrfm.evaluation.audio_checks):

  check_codec       fresh renders of held-out note clips -> encode -> decode: does the pitch class survive?
  check_generation  unsteered generations: is there a clear dominant pitch class, and which classes come out?
  activation_scale  mean norm of the residual stream per layer, where steering adds its vectors: the
                    scale against which a coefficient eta0 is large or small

Both compare with the rendered originals, which bound what the check itself can read.
"""

from __future__ import annotations

import numpy as np
import torch

from musicrfm.engine.model import MusicModel

from .corpus import CorpusSettings, plan_corpus

__all__ = ["check_codec", "check_generation", "activation_scale", "heldout_note_clips", "CAPTIONS"]

# Example captions, one per instrument family (13: prime to the 12 pitch classes, so a sweep that cycles
# prompts and target classes together pairs every class with every family in turn).
CAPTIONS = (
    "piano note, middle register", "guitar note, low register", "strings note, middle register",
    "brass note, middle register", "flute note, high register", "synth lead note, middle register",
    "organ note, low register", "reed note, middle register", "mallet note, high register",
    "synth pad note, middle register", "bass note, low register", "ensemble note, middle register",
    "folk note, middle register",
)


def heldout_note_clips(count: int, seed: int = 0, settings: CorpusSettings = CorpusSettings()):
    """`count` held-out (never trained on) note clips of the corpus plan: [(ClipSpec, Clip)]."""
    held = [(spec, clip) for spec, clip in plan_corpus(settings) if clip.validation and clip.concept == "notes"]
    rng = np.random.default_rng(seed)
    return [held[i] for i in sorted(rng.choice(len(held), min(count, len(held)), replace=False))]


@torch.no_grad()
def check_codec(model: MusicModel, clips: int = 60, seed: int = 0, progress: bool = True) -> dict:
    from tqdm import tqdm

    from musicrfm.evaluation.audio_checks import estimate_pitch_class
    from musicrfm.probes.dataset import resample
    from musicrfm.probes.syntheory import SAMPLE_RATE, render_clip

    codec = model.hf.audio_encoder
    agree = originals = 0
    confidence = []
    picked = heldout_note_clips(clips, seed)
    for spec, clip in tqdm(picked, disable=not progress, desc="codec check"):
        audio = resample(render_clip(spec), SAMPLE_RATE, model.sample_rate)
        x = torch.from_numpy(audio)[None, None].to(model.device, model.dtype)
        enc = codec.encode(x, bandwidth=codec.config.target_bandwidths[-1])
        y = codec.decode(enc.audio_codes, enc.audio_scales)[0][0, 0, : x.shape[-1]].float().cpu().numpy()
        pc, conf = estimate_pitch_class(y, model.sample_rate)
        agree += pc == clip.pitch_class
        confidence.append(conf)
        originals += estimate_pitch_class(audio, model.sample_rate)[0] == clip.pitch_class
    n = len(picked)
    return {"clips": n, "agreement": round(agree / n, 4), "originals_agreement": round(originals / n, 4),
            "mean_confidence": round(float(np.mean(confidence)), 4)}


def check_generation(model: MusicModel, samples: int = 24, seconds: float = 4.0, seed: int = 1,
                     progress: bool = True) -> dict:
    """Unsteered generations with the CAPTIONS: dominant pitch class and its confidence per clip (share of
    the pitch-class profile; 1/12 = flat), and how the classes spread (unsteered should be near uniform)."""
    from tqdm import tqdm

    from musicrfm.engine.generation import generate
    from musicrfm.evaluation.audio_checks import estimate_pitch_class

    classes, confidence = [], []
    for i in tqdm(range(samples), disable=not progress, desc="generation check"):
        out = generate(model, CAPTIONS[i % len(CAPTIONS)], seconds, seed=seed * 100_003 + i, progress=False)
        pc, conf = estimate_pitch_class(out.audio, out.sample_rate)
        classes.append(pc)
        confidence.append(conf)
    counts = np.bincount(classes, minlength=12)
    return {"samples": samples, "seconds": seconds, "mean_confidence": round(float(np.mean(confidence)), 4),
            "median_confidence": round(float(np.median(confidence)), 4),
            "class_counts": counts.tolist(), "most_common_share": round(float(counts.max() / samples), 4),
            "confidence": [round(c, 3) for c in confidence]}


@torch.no_grad()
def activation_scale(model: MusicModel, clips: int = 24, seed: int = 0, prompt: str = "") -> list[float]:
    """Mean Euclidean norm of the residual stream at each layer's output ("residual" injection point),
    over every position of `clips` held-out note clips fed as the engine feeds them."""
    from musicrfm.engine.decoder import MusicgenDecoder, delayed_inputs
    from musicrfm.probes.dataset import resample
    from musicrfm.probes.extract import encode_audio
    from musicrfm.probes.syntheory import SAMPLE_RATE, render_clip

    audio = torch.stack([torch.from_numpy(resample(render_clip(spec), SAMPLE_RATE, model.sample_rate))
                         for spec, _ in heldout_note_clips(clips, seed)])
    codes = encode_audio(model, audio)
    frames = codes.shape[-1]
    dec = MusicgenDecoder(model, rows=len(codes), capacity=frames + 1)
    dec.set_conditioning(dec.encode_text([prompt] * len(codes), guidance=False))
    norms: dict[int, float] = {}

    def capture(layer: int, h: torch.Tensor) -> None:
        norms[layer] = float(torch.linalg.vector_norm(h.float(), dim=-1).mean())

    dec.forward(delayed_inputs(codes, 0, frames, model.pad_token_id), capture=capture)
    return [round(norms[i], 2) for i in range(model.num_layers)]
