"""Train musicgen-mini's codec: transformers' `EncodecModel` (SEANet encoder/decoder, residual VQ) with
our own training, because transformers ships the codec for inference only. Its codebooks are buffers
(`embed`, `embed_avg`, `cluster_size`, `inited`) and its `encode` is a hard argmin; the residual-VQ
training below (data-initialised codebooks, straight-through estimator, commitment loss, EMA updates,
restarts of dead codes, quantizer dropout) writes those same buffers, so the trained codec is an
ordinary `EncodecModel` that `encode()`/`decode()` and the engine's streaming decoder use unchanged.

Recipe (why each piece is there):
- 16 kHz, hop 320 (50 frames/s, MusicGen's rate): every pitch the corpus holds (C2-B6) keeps eight
  harmonics below Nyquist for all but the top octave, at half the cost of 32 kHz.
- An autoencoder warm-up without the quantizer: the encoder and decoder learn to carry pitch before
  codebooks are fitted to their latents (codebooks fitted to an untrained encoder are wasted).
- Spectral loss on power-compressed magnitudes (|X|^0.3) at 32-256 ms windows, plus spectral
  convergence: a harmonic's peak gets the weight it has in the ear and in the pitch check; a log
  magnitude would spend the loss on near-silent bins. A small waveform L1 keeps the level.
- No adversarial loss: the corpus is clean synthesiser audio and the goal is pitch, not realism.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import Corpus
from .training import load_checkpoint, save_checkpoint, train_for

__all__ = ["CodecSettings", "codec_config", "build_codec", "train_codec", "pitch_agreement"]


@dataclass(frozen=True)
class CodecSettings:
    seed: int = 0
    sample_rate: int = 16_000
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder upsampling; hop = product = 320
    num_filters: int = 16
    hidden_size: int = 64  # latent = codebook dimension
    lstm_layers: int = 1
    codebooks: int = 4
    codebook_size: int = 512
    segment_seconds: float = 0.5
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 1500  # autoencoder only, then the quantizer comes in
    commitment: float = 0.5
    ema_decay: float = 0.99
    dead_after: int = 200  # steps a code may go unused before it is restarted on a random latent
    quantizer_dropout: float = 0.5  # share of batches that use only the first k < codebooks quantizers
    wave_weight: float = 0.1

    @property
    def bandwidth_kbps(self) -> float:
        hop = math.prod(self.ratios)
        return self.codebooks * math.log2(self.codebook_size) * self.sample_rate / hop / 1000


def codec_config(s: CodecSettings):
    from transformers import EncodecConfig

    return EncodecConfig(sampling_rate=s.sample_rate, audio_channels=1, hidden_size=s.hidden_size,
                         num_filters=s.num_filters, num_residual_layers=1, upsampling_ratios=list(s.ratios),
                         codebook_size=s.codebook_size, target_bandwidths=[s.bandwidth_kbps],
                         use_causal_conv=False, num_lstm_layers=s.lstm_layers, use_conv_shortcut=False,
                         normalize=False)


def build_codec(s: CodecSettings):
    from transformers import EncodecModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        codec = EncodecModel(codec_config(s))
    for layer in codec.quantizer.layers:
        layer.codebook.inited.fill_(0)  # "not fitted yet": the first quantized batch initialises it
    return codec


# --- losses ----------------------------------------------------------------------------------------

_WINDOWS = (512, 1024, 2048, 4096)


def spectral_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multi-resolution loss between output y and target x ([B, T]): spectral convergence plus L1 of
    power-compressed magnitudes, averaged over the windows."""
    total = y.new_zeros(())
    for n in _WINDOWS:
        window = torch.hann_window(n, device=x.device)
        X = torch.stft(x, n, n // 4, window=window, return_complex=True).abs()
        Y = torch.stft(y, n, n // 4, window=window, return_complex=True).abs()
        sc = torch.linalg.norm(Y - X) / (torch.linalg.norm(X) + 1e-7)
        Xc, Yc = (X + 1e-7) ** 0.3, (Y + 1e-7) ** 0.3
        total = total + sc + (Yc - Xc).abs().mean() / (Xc.abs().mean() + 1e-7)
    return total / len(_WINDOWS)


# --- residual VQ training ----------------------------------------------------------------------------


class ResidualVQTrainer:
    """Training-time forward of the codec's residual VQ, on its own buffers."""

    def __init__(self, codec, s: CodecSettings):
        self.layers = [layer.codebook for layer in codec.quantizer.layers]
        self.s = s
        self.last_used = [torch.zeros(cb.codebook_size, dtype=torch.long) for cb in self.layers]

    def __call__(self, z: torch.Tensor, step: int, n_q: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """z [B, D, T] -> (quantized with straight-through gradients, commitment loss, codes used per layer).
        Random choices (initial and restarted codes) are drawn from (seed, step): a resumed run repeats them."""
        self.rng = torch.Generator().manual_seed(self.s.seed * 1_000_003 + step)
        B, D, T = z.shape
        flat = z.permute(0, 2, 1).reshape(-1, D)
        residual = flat
        quantized = torch.zeros_like(flat)
        commit = flat.new_zeros(())
        used = []
        for k, cb in enumerate(self.layers[:n_q]):
            r = residual.detach()
            if not bool(cb.inited.item()):
                self._fit(cb, r)
            dist = r.pow(2).sum(1, keepdim=True) - 2 * r @ cb.embed.t() + cb.embed.pow(2).sum(1)[None]
            index = dist.argmin(1)
            q = F.embedding(index, cb.embed)
            commit = commit + F.mse_loss(residual, q.detach())
            self._update(cb, k, r, index, step)
            used.append(int(torch.unique(index).numel()))
            quantized = quantized + q
            residual = residual - q.detach()
        # straight-through: the decoder sees the codes' vectors, the encoder gets the decoder's gradient
        out = flat + (quantized - flat).detach()
        return out.reshape(B, T, D).permute(0, 2, 1), commit, used

    @torch.no_grad()
    def _fit(self, cb, r: torch.Tensor) -> None:
        # k-means++-like seeding is not needed: random latents of a warmed-up encoder spread well.
        pick = r[torch.randperm(r.shape[0], generator=self.rng)[: cb.codebook_size]]
        if pick.shape[0] < cb.codebook_size:
            pick = r[torch.randint(0, r.shape[0], (cb.codebook_size,), generator=self.rng)]
        cb.embed.copy_(pick)
        cb.embed_avg.copy_(pick)
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1)

    @torch.no_grad()
    def _update(self, cb, k: int, r: torch.Tensor, index: torch.Tensor, step: int) -> None:
        decay, eps = self.s.ema_decay, 1e-5
        onehot = F.one_hot(index, cb.codebook_size).to(r.dtype)
        cb.cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        cb.embed_avg.mul_(decay).add_(onehot.t() @ r, alpha=1 - decay)
        n = cb.cluster_size.sum()
        size = (cb.cluster_size + eps) / (n + cb.codebook_size * eps) * n
        cb.embed.copy_(cb.embed_avg / size[:, None])
        last = self.last_used[k]
        last[index] = step
        dead = (step - last) > self.s.dead_after
        if dead.any():
            fresh = r[torch.randint(0, r.shape[0], (int(dead.sum()),), generator=self.rng)]
            cb.embed[dead] = fresh
            cb.embed_avg[dead] = fresh
            cb.cluster_size[dead] = 1.0
            last[dead] = step


# --- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def pitch_agreement(codec, corpus: Corpus, indices: np.ndarray, *, quantized: bool = True) -> dict:
    """Share of clips whose encode -> decode keeps the labelled pitch class (musicrfm.evaluation.audio_checks), next to
    the share the originals get (the check's own ceiling on these clips)."""
    from musicrfm.evaluation.audio_checks import estimate_pitch_class

    was_training = codec.training
    codec.eval()
    sr = corpus.settings.sample_rate
    agree = ceiling = 0
    for i in indices:
        x = torch.from_numpy(corpus.waveform(int(i)))[None, None]
        if quantized:
            enc = codec.encode(x, bandwidth=codec.config.target_bandwidths[-1])
            y = codec.decode(enc.audio_codes, enc.audio_scales)[0]
        else:
            y = codec.decoder(codec.encoder(x))
        y = y[0, 0, : x.shape[-1]].float().numpy()
        label = corpus.clips[int(i)].pitch_class
        agree += estimate_pitch_class(y, sr)[0] == label
        ceiling += estimate_pitch_class(x[0, 0].numpy(), sr)[0] == label
    codec.train(was_training)
    return {"clips": len(indices), "agreement": agree / len(indices), "originals": ceiling / len(indices)}


def eval_clips(corpus: Corpus, count: int, seed: int = 0) -> np.ndarray:
    held = corpus.indices(validation=True, concept="notes")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(held, min(count, len(held)), replace=False))


# --- training ---------------------------------------------------------------------------------------


def train_codec(corpus: Corpus, out: str | Path, s: CodecSettings = CodecSettings(), *, minutes: float | None = None,
                steps: int | None = None, eval_every: float = 10.0, eval_clip_count: int = 48,
                threads: int | None = None, progress: bool = True) -> dict:
    """Train (or resume training) the codec in `out`/checkpoint; returns the training state."""
    if threads:
        torch.set_num_threads(threads)
    if corpus.settings.sample_rate != s.sample_rate:
        raise ValueError(f"corpus is at {corpus.settings.sample_rate} Hz, the codec at {s.sample_rate} Hz")
    out = Path(out)
    codec = build_codec(s)
    opt = torch.optim.Adam(codec.parameters(), lr=s.lr, betas=(0.8, 0.99))
    state = load_checkpoint(out / "checkpoint", codec, opt)
    if state is not None and state["settings"] != json.loads(json.dumps(asdict(s))):
        raise ValueError(f"{out} was trained with other settings: {state['settings']}")
    state = state or {"step": 0, "seconds": 0.0, "settings": asdict(s), "log": [], "evals": []}
    codec.train()
    vq = ResidualVQTrainer(codec, s)
    for last, saved in zip(vq.last_used, state.get("vq_last_used", [])):  # dead-code clocks, for an exact resume
        last.copy_(torch.tensor(saved))
    train = corpus.indices(validation=False)
    segment = int(s.segment_seconds * s.sample_rate)
    segment -= segment % math.prod(s.ratios)
    evals = eval_clips(corpus, eval_clip_count, s.seed)
    window: list[dict] = []

    def step_fn(step: int) -> dict:
        rng = np.random.default_rng([s.seed, step])
        rows = rng.choice(train, s.batch_size)
        starts = rng.integers(0, corpus.audio.shape[1] - segment, s.batch_size)
        x = torch.from_numpy(np.stack([corpus.audio[r, a : a + segment] for r, a in zip(rows, starts)])
                             .astype(np.float32) / 32768.0)[:, None]
        z = codec.encoder(x)
        if step < s.warmup_steps:
            zq, commit, used = z, z.new_zeros(()), []
        else:
            n_q = s.codebooks if rng.random() >= s.quantizer_dropout else int(rng.integers(1, s.codebooks + 1))
            zq, commit, used = vq(z, step, n_q)
        y = codec.decoder(zq)[..., : x.shape[-1]]
        spec = spectral_loss(y[:, 0], x[:, 0])
        wave = F.l1_loss(y, x)
        loss = spec + s.wave_weight * wave + s.commitment * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), "spec": round(spec.item(), 4),
                  "wave": round(wave.item(), 4), "commit": round(float(commit.detach()), 4), "codes": used}
        window.append(record)
        return {"loss": record["loss"]}

    def checkpoint(step: int, seconds: float) -> None:
        if window:
            state["log"].append({"step": step, "seconds": round(seconds, 1),
                                 **{k: round(float(np.mean([r[k] for r in window])), 4)
                                    for k in ("loss", "spec", "wave", "commit")},
                                 "codes": window[-1]["codes"]})
            window.clear()
        began = time.perf_counter()
        result = pitch_agreement(codec, corpus, evals, quantized=step > s.warmup_steps)
        result.update(step=step, seconds=round(seconds, 1), quantized=step > s.warmup_steps,
                      eval_seconds=round(time.perf_counter() - began, 1))
        state["evals"].append(result)
        state.update(step=step, seconds=seconds, vq_last_used=[last.tolist() for last in vq.last_used])
        save_checkpoint(out / "checkpoint", codec, opt, dict(state))
        if progress:
            print(f"[codec] step {step} ({seconds / 60:.1f} min): {state['log'][-1] if state['log'] else ''} "
                  f"pitch agreement {result['agreement']:.2f} of {result['clips']} "
                  f"({'quantized' if result['quantized'] else 'autoencoder'}; originals {result['originals']:.2f})",
                  flush=True)

    train_for(step_fn, start_step=state["step"], start_seconds=state["seconds"], minutes=minutes, steps=steps,
              every=(eval_every, checkpoint), progress=progress, desc="codec")
    return state
