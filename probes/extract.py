"""Per-layer MusicGen features of audio clips, read exactly where the engine steers.

audio (32 kHz mono) -> EnCodec codes (the model's own codec, its K codebooks) -> the decoder, fed the way
generation feeds it: BOS, then the delay pattern (position p carries codebook k of frame p - k - 1),
text-conditioned by a prompt (empty by default), conditional row only -> the activations at one injection
point of every decoder block (engine/decoder.py: "residual", the residual stream at the block's output, by
default; or "attention", the self-attention output before the residual add, the second method's site) ->
pooled over the clip's valid positions 1..F (mean, and the last position for the paper's ablation). The
site is recorded in every shard and the index (`injection_point`), a directory never mixes sites, and the
bank trained on it carries it, so steering writes where the probe read.

The reference code fed codes without BOS, without the delay pattern and without text conditioning, and
took the last layer after the final LayerNorm, so its probes saw states that steering never touches.

Features are stored as float16 in shards (`part-NNNNN.safetensors`, one per batch of clips) with JSON
metadata naming the model fingerprint, prompt and pooling; a directory never mixes models or prompts,
and an interrupted run resumes at the first missing shard. Each shard also keeps, per layer, the count, sum
and sum of squares of the per-token norm |h| over its clips' valid positions: the bank's `LayerNorms`, which
relative steering strength is a fraction of (`load_layer_norms`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from musicrfm.engine.bank import LayerNorms
from musicrfm.engine.decoder import INJECTION_POINTS
from musicrfm.engine.model import ModelFingerprint, MusicModel
from musicrfm.engine.norms import NormAccumulator, read_activations

FORMAT = "musicrfm.features"
VERSION = 1
POOLINGS = ("mean", "last")
NORM_TENSORS = ("norm_count", "norm_sum", "norm_squares")  # per shard, float64 [L']: the |h| statistics


class FeatureError(ValueError):
    """A feature directory that cannot be used as asked (other model, other prompt, corrupt shard)."""


@dataclass(frozen=True)
class ExtractionSettings:
    prompt: str = ""
    batch_size: int = 8
    shard_size: int = 256  # clips per shard file; a multiple of batch_size keeps batches whole
    layers: tuple[int, ...] | None = None  # None = every decoder block
    site: str = "residual"  # the injection point read (engine.decoder.INJECTION_POINTS)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")
        if self.site not in INJECTION_POINTS:
            raise ValueError(f"site must be one of {', '.join(INJECTION_POINTS)}, got {self.site!r}")


@torch.no_grad()
def encode_audio(model: MusicModel, audio: torch.Tensor) -> torch.Tensor:
    """[B, samples] float audio at the model's sample rate -> codes [B, K, frames] (K = decoder codebooks;
    residual quantisation makes the first K codebooks exactly the K-codebook encoding)."""
    codec = model.hf.audio_encoder
    x = audio.to(device=model.device, dtype=model.dtype)[:, None, :]
    codes = codec.encode(x).audio_codes[0]  # [B, K', frames]
    if codes.shape[1] < model.num_codebooks:
        raise ValueError(f"codec gives {codes.shape[1]} codebooks, decoder needs {model.num_codebooks}")
    return codes[:, : model.num_codebooks]


@torch.no_grad()
def decoder_features(model: MusicModel, codes: torch.Tensor, prompt: str = "",
                     layers: Sequence[int] | None = None, frames: torch.Tensor | None = None,
                     norms: NormAccumulator | None = None, site: str = "residual") -> dict[str, torch.Tensor]:
    """Pooled features of a batch of code sequences at injection point `site` (the residual stream by default).

    codes [B, K, F]; `frames` [B] = valid frames per clip (default F). Returns {"mean": [B, L', d],
    "last": [B, L', d]} in float32 for the selected layers. `norms` (indexed by position in `layers`)
    accumulates the per-token |h| of the valid positions."""
    b, _, f = codes.shape
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    frames = torch.full((b,), f) if frames is None else frames.cpu()
    if (frames < 1).any() or (frames > f).any():
        raise ValueError(f"valid frame counts must lie in [1, {f}], got {frames.tolist()}")
    # Position p (1..F) is the step whose input holds frame p-1's first codebook: clip i keeps 1..frames[i].
    pos = torch.arange(f + 1)
    valid = (pos[None, :] >= 1) & (pos[None, :] <= frames[:, None])
    weights = (valid.float() / valid.sum(1, keepdim=True)).to(model.device)
    last = frames.to(model.device)
    column = {layer: j for j, layer in enumerate(layers)}
    pooled_mean: dict[int, torch.Tensor] = {}
    pooled_last: dict[int, torch.Tensor] = {}

    def capture(i: int, h: torch.Tensor) -> None:
        if i in column:
            h = h.float()
            pooled_mean[i] = torch.einsum("bt,btd->bd", weights, h)
            pooled_last[i] = h[torch.arange(b, device=h.device), last]
            if norms is not None:
                norms.add(column[i], h, valid)

    read_activations(model, codes, prompt, capture, site)
    return {"mean": torch.stack([pooled_mean[i] for i in layers], 1).cpu(),
            "last": torch.stack([pooled_last[i] for i in layers], 1).cpu()}


@dataclass
class FeatureSet:
    """Features of one concept, loaded for training: [N, L', d] per pooling, with labels."""

    concept: str
    fingerprint: ModelFingerprint
    layers: list[int]
    labels: list[str]
    stems: list[str]
    targets: list[float] | None  # numeric targets (tempo BPM) where the concept has them
    prompt: str
    classes: list[str]  # class names in the data set's order (e.g. C, C#, D, ...)
    site: str = "residual"  # the injection point the features were read at
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # pooling -> [N, L', d] float16

    def layer(self, pooling: str, layer: int) -> torch.Tensor:
        return self.features[pooling][:, self.layers.index(layer)]


def _natural_key(name: str) -> list:
    """Class names in a human order: "2" before "10", "C" before "C#"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _shard_meta(model: MusicModel, concept: str, settings: ExtractionSettings, layers: list[int]) -> dict:
    return {"format": FORMAT, "version": VERSION, "concept": concept, "fingerprint": model.fingerprint.to_dict(),
            "model": model.name, "prompt": settings.prompt, "layers": layers, "injection_point": settings.site,
            "poolings": list(POOLINGS)}


def _check_compatible(existing: dict, wanted: dict, path: Path) -> None:
    for key in ("format", "version", "concept", "fingerprint", "prompt", "layers", "injection_point"):
        if existing.get(key) != wanted.get(key):
            raise FeatureError(f"{path}: holds features with {key} = {existing.get(key)!r}, this run would write "
                               f"{wanted.get(key)!r}; use another output directory (features never mix)")


def _read_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["musicrfm"])
    except Exception as exc:  # corrupt or foreign file: name it
        raise FeatureError(f"{path}: not a readable musicrfm feature shard ({exc})") from None


def extract_concept(
    model: MusicModel,
    concept: str,
    clips: Sequence[str | Path],
    labels: Sequence[str],
    out_dir: str | Path,
    *,
    settings: ExtractionSettings = ExtractionSettings(),
    targets: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    load_audio: Callable[[str | Path, int], np.ndarray],
    progress: bool = True,
) -> Path:
    """Extract features of `clips` into out_dir/<concept>/; returns that directory. Resumable."""
    if len(clips) != len(labels) or (targets is not None and len(targets) != len(clips)):
        raise ValueError("clips, labels (and targets) must have the same length")
    if not clips:
        raise ValueError(f"no clips for concept {concept!r}")
    layers = list(settings.layers) if settings.layers is not None else list(range(model.num_layers))
    bad = [i for i in layers if not 0 <= i < model.num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {model.num_layers} (0..{model.num_layers - 1})")
    folder = Path(out_dir) / concept
    folder.mkdir(parents=True, exist_ok=True)
    meta = _shard_meta(model, concept, settings, layers)
    classes = list(classes) if classes is not None else sorted(set(labels), key=_natural_key)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {classes}")
    index = {"clips": [str(c) for c in clips], "labels": list(labels), "classes": classes,
             "targets": list(map(float, targets)) if targets is not None else None, **meta}
    index_path = folder / "index.json"
    if index_path.exists():
        old = json.loads(index_path.read_text())
        _check_compatible(old, meta, index_path)
        if old.get("clips") != index["clips"]:
            raise FeatureError(f"{index_path}: was written for another list of clips; use another directory")
    else:
        index_path.write_text(json.dumps(index, indent=1))
    starts = range(0, len(clips), settings.shard_size)
    with tqdm(total=len(clips), unit="clip", desc=f"extract {concept}", disable=not progress) as bar:
        for shard, start in enumerate(starts):
            path = folder / f"part-{shard:05d}.safetensors"
            stop = min(start + settings.shard_size, len(clips))
            if path.exists():
                _check_compatible(_read_meta(path), meta, path)
                bar.update(stop - start)
                continue
            parts: dict[str, list[torch.Tensor]] = {p: [] for p in POOLINGS}
            norms = NormAccumulator(len(layers))
            for b0 in range(start, stop, settings.batch_size):
                batch = clips[b0: min(b0 + settings.batch_size, stop)]
                audio = [torch.from_numpy(np.asarray(load_audio(c, model.sample_rate), dtype=np.float32)) for c in batch]
                length = max(a.shape[0] for a in audio)
                padded = torch.stack([torch.nn.functional.pad(a, (0, length - a.shape[0])) for a in audio])
                codes = encode_audio(model, padded)
                frames = torch.tensor([max(1, min(codes.shape[2], a.shape[0] // model.hop_length)) for a in audio])
                feats = decoder_features(model, codes, settings.prompt, layers, frames, norms, settings.site)
                for p in POOLINGS:
                    parts[p].append(feats[p].to(torch.float16))
                bar.update(len(batch))
            tensors = {p: torch.cat(parts[p]).contiguous() for p in POOLINGS}
            tensors["rows"] = torch.arange(start, stop)
            tensors.update(zip(NORM_TENSORS, (norms.count, norms.total, norms.squares)))
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"musicrfm": json.dumps(meta)})
            os.replace(tmp, path)  # a shard is either complete or absent
    return folder


def load_layer_norms(folder: str | Path, num_layers: int) -> LayerNorms | None:
    """The typical |h| per layer over every clip of a concept's feature directory, for a bank of a model with
    `num_layers` layers; None when the features do not cover every layer or predate the norm statistics."""
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    if list(index["layers"]) != list(range(num_layers)):
        return None
    acc = NormAccumulator(num_layers)
    for path in sorted(folder.glob("part-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if not set(NORM_TENSORS) <= set(f.keys()):
                return None
            acc.add_sums(*(f.get_tensor(name) for name in NORM_TENSORS))
    prompt = index.get("prompt", "")
    site = index.get("injection_point", "residual")
    return acc.result(f"extraction: {int(acc.count.min())} token positions of {len(index['clips'])} "
                      f"{index['concept']} clips at the {site} site, prompt {prompt!r}"[:300])


def load_features(folder: str | Path, fingerprint: ModelFingerprint | None = None,
                  layers: Sequence[int] | None = None, poolings: Sequence[str] = POOLINGS) -> FeatureSet:
    """Load a concept's feature directory (optionally only some layers, to train shard by layer)."""
    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise FeatureError(f"{folder}: no index.json; run `musicrfm extract` first")
    index = json.loads(index_path.read_text())
    fp = ModelFingerprint.from_dict(index["fingerprint"])
    if fingerprint is not None and fp != fingerprint:
        raise FeatureError(f"{folder}: features are from {fp.describe()}, expected {fingerprint.describe()}")
    stored = list(index["layers"])
    want = stored if layers is None else list(layers)
    missing = [i for i in want if i not in stored]
    if missing:
        raise FeatureError(f"{folder}: layers {missing} were not extracted (have {stored})")
    cols = [stored.index(i) for i in want]
    n = len(index["clips"])
    shard_paths = sorted(folder.glob("part-*.safetensors"))
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    rows = []
    for path in shard_paths:
        _check_compatible(_read_meta(path), index, path)
        with safe_open(str(path), framework="pt") as f:
            rows.append(f.get_tensor("rows"))
            for p in poolings:
                # Slice per layer on the file, so training one layer never reads the others.
                sl = f.get_slice(p)
                feats[p].append(torch.cat([sl[:, c:c + 1] for c in cols], dim=1))
    covered = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    if not torch.equal(covered.sort().values, torch.arange(n)):
        raise FeatureError(f"{folder}: shards cover {covered.numel()} of {n} clips; finish `musicrfm extract` first")
    order = covered.argsort()
    return FeatureSet(concept=index["concept"], fingerprint=fp, layers=want, labels=index["labels"],
                      stems=[Path(c).stem for c in index["clips"]], targets=index.get("targets"),
                      prompt=index["prompt"], classes=index["classes"],
                      site=index.get("injection_point", "residual"),
                      features={p: torch.cat(feats[p])[order] for p in poolings})
