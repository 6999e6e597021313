"""Offline generation: run the decode loop for a fixed length, decode audio as a stream, describe it all.

The sidecar (`Generation.settings`) holds every setting that decides the tokens, so `generate_from_sidecar`
regenerates them exactly (same model, device and dtype); `tokens_sha256` lets anyone check that.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .audio import StreamingDecoder
from .bank import DirectionBank
from .loop import Generator
from .model import NOISE_WARNING, MusicModel, load_model
from .sampling import SamplingConfig
from .steering import SteeringPlan, SteeringSpec

SIDECAR_FORMAT = "musicrfm.render"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokens_sha256(codes: torch.Tensor) -> str:
    return hashlib.sha256(codes.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def provenance(model: MusicModel, bank_paths: Sequence[str | Path]) -> dict:
    """What made a file's tokens, as a generation sidecar and a recording log's header both record it
    (docs/formats.md): the model, its fingerprint, whether its weights are random, device and dtype, and
    each bank with its hash (so a later run can refuse a bank that changed: `check_bank_hashes`)."""
    return {
        "model": model.name,
        "model_fingerprint": model.fingerprint.to_dict(),
        "random_weights": model.is_random,
        "device": model.device.type,
        "dtype": str(model.dtype).replace("torch.", ""),
        "banks": [{"path": str(p), "sha256": file_sha256(p)} for p in bank_paths],
    }


def check_bank_hashes(entries: list[dict], source: str, since: str) -> None:
    """Banks named by a sidecar or log ({"path", "sha256"} each) must exist and be unchanged: the same
    settings with another bank would silently steer elsewhere."""
    for b in entries:
        if not Path(b["path"]).is_file():
            raise FileNotFoundError(f"direction bank {b['path']} named in the {source} is missing")
        if file_sha256(b["path"]) != b["sha256"]:
            raise ValueError(f"direction bank {b['path']} changed since the {since} (sha256 differs)")


def load_banks(paths: list[str | Path]) -> DirectionBank | None:
    """Load and merge direction banks (each may hold several concepts)."""
    bank = None
    for p in paths:
        b = DirectionBank.load(p)
        bank = b if bank is None else bank.merge(b)
    return bank


@dataclass
class Generation:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    codes: torch.Tensor  # [K, frames]
    settings: dict = field(default_factory=dict)


def generate(
    model: MusicModel,
    prompt: str,
    seconds: float,
    *,
    spec: SteeringSpec | None = None,
    bank_paths: list[str | Path] = (),
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    chunk_steps: int = 50,
    context_steps: int | None = None,
    keep_steps: int | None = None,
    progress: bool = True,
) -> Generation:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    frames = max(1, round(seconds * model.frame_rate))
    bank = load_banks(list(bank_paths))
    plan = None
    if spec is not None and spec.controls:
        if bank is None:
            raise ValueError("steering needs at least one direction bank (--bank FILE)")
        plan = SteeringPlan.compile(spec, bank, model.fingerprint, device=model.device, dtype=model.dtype)
    gen = Generator(model, prompt, sampling=sampling, seed=seed, plan=plan, total_frames=frames,
                    context_steps=context_steps, keep_steps=keep_steps)
    stream = StreamingDecoder(model.hf.audio_encoder)
    pieces = []
    with tqdm(total=gen.steps_for_frames(frames), unit="step", disable=not progress,
              desc=model.progress_label("generating")) as bar:
        while not gen.finished:
            chunk = gen.chunk(chunk_steps)
            bar.update(chunk.steps[1] - chunk.steps[0])
            pieces.append(stream.push(chunk.codes))
    pieces.append(stream.flush())
    audio = torch.cat([p.reshape(-1).float().cpu() for p in pieces]).numpy()
    codes = gen.codes()
    settings = {
        "format": SIDECAR_FORMAT,
        "version": 1,
        **provenance(model, bank_paths),
        "note": NOISE_WARNING if model.is_random else "",
        "prompt": prompt,
        "seconds": seconds,
        "frames": frames,
        "sample_rate": model.sample_rate,
        "seed": seed,
        "sampling": sampling.to_dict(),
        "steering": spec.to_dict() if spec is not None else None,
        "context_steps": gen.context_steps,
        "keep_steps": gen.keep_steps,
        "chunk_steps": chunk_steps,
        "tokens_sha256": tokens_sha256(codes),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return Generation(audio=audio, sample_rate=model.sample_rate, codes=codes, settings=settings)


def generate_from_sidecar(settings: dict, *, progress: bool = True, model: MusicModel | None = None) -> Generation:
    """Regenerate a generation from its sidecar. Banks are checked against the recorded hashes."""
    if settings.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"not a musicrfm render sidecar (format {settings.get('format')!r})")
    check_bank_hashes(settings.get("banks", []), "sidecar", "render")
    if model is None:
        model = load_model(settings["model"], device=settings["device"], dtype=settings["dtype"])
    spec = SteeringSpec.from_dict(settings["steering"]) if settings.get("steering") else None
    return generate(
        model, settings["prompt"], settings["seconds"], spec=spec,
        bank_paths=[b["path"] for b in settings.get("banks", [])],
        sampling=SamplingConfig.from_dict(settings["sampling"]), seed=settings["seed"],
        chunk_steps=settings["chunk_steps"], context_steps=settings["context_steps"],
        keep_steps=settings["keep_steps"], progress=progress,
    )


def write_sidecar(path: str | Path, settings: dict) -> None:
    Path(path).write_text(json.dumps(settings, indent=2) + "\n")
