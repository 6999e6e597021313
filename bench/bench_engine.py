"""Decode-loop throughput, side by side in one run (interleaved repeats, medians):

  own loop vs transformers `generate`   same model, device, dtype, steps, sampling (top-k 250, CFG 3)
  steered vs unsteered own loop          2 directions, all layers, gate p = 0.3

Random-weight models: the architecture and cost are real, the audio is noise (not decoded here).
Usage: python bench/bench_engine.py --models tiny-random,random-small --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.utils import logging as hf_logging

from engine.bank import DirectionBank
from engine.loop import Generator
from engine.model import load_model
from engine.sampling import SamplingConfig
from engine.steering import DirectionControl, LayerWeighting, SteeringPlan, SteeringSpec

SAMPLING = SamplingConfig(guidance_scale=3.0, top_k=250, temperature=1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_bank(model, concepts=("notes", "chords"), seed=0) -> DirectionBank:
    g = torch.Generator().manual_seed(seed)
    banks = []
    for c in concepts:
        vecs = torch.randn(2, model.num_layers, model.hidden_size, generator=g)
        scores = torch.rand(2, model.num_layers, generator=g)
        banks.append(DirectionBank.from_arrays(c, ["a", "b"], vecs, scores, model.fingerprint, method="random",
                                               pooling="mean"))
    return banks[0].merge(banks[1])


def time_own(model, steps, plan=None) -> float:
    _sync(model.device)
    t0 = time.perf_counter()
    gen = Generator(model, "lofi piano", sampling=SAMPLING, seed=0, plan=plan)
    gen.run(steps)
    _sync(model.device)
    return steps / (time.perf_counter() - t0)


def time_hf(model, steps) -> float:
    class _NoAudio:  # generate() ends with an EnCodec decode; leave it out of a decoder comparison
        audio_values = torch.zeros(1)

    decode = model.hf.audio_encoder.decode
    model.hf.audio_encoder.decode = lambda *a, **k: _NoAudio()
    try:
        _sync(model.device)
        t0 = time.perf_counter()
        inputs = model.tokenizer(["lofi piano"], return_tensors="pt").to(model.device)
        model.hf.generate(**inputs, max_new_tokens=steps, do_sample=True, top_k=250, guidance_scale=3.0)
        _sync(model.device)
        return steps / (time.perf_counter() - t0)
    finally:
        model.hf.audio_encoder.decode = decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-random,random-small")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    print(f"{'model':<14} {'device':<6} {'dtype':<9} {'own st/s':>9} {'hf st/s':>9} {'own/hf':>7} "
          f"{'steered':>9} {'overhead':>9} {'x realtime':>10}")
    for name in args.models.split(","):
        model = load_model(name, device=args.device, dtype=args.dtype)
        spec = SteeringSpec(
            controls=(DirectionControl("notes:a", 0.4), DirectionControl("chords:b", 0.3)),
            gate_p=0.3, layers=LayerWeighting(mode="all"),
        )
        plan = SteeringPlan.compile(spec, random_bank(model), model.fingerprint, device=model.device,
                                    dtype=model.dtype)
        time_own(model, 5), time_hf(model, 5)  # warm-up (allocator, kernels)
        own, hf, steered = [], [], []
        for _ in range(args.repeats):  # interleaved, so drift hits all three alike
            own.append(time_own(model, args.steps))
            hf.append(time_hf(model, args.steps))
            steered.append(time_own(model, args.steps, plan))
        o, h, s = (statistics.median(x) for x in (own, hf, steered))
        print(f"{name:<14} {model.device.type:<6} {str(model.dtype)[6:]:<9} {o:>9.1f} {h:>9.1f} {o / h:>6.2f}x "
              f"{s:>9.1f} {100 * (o / s - 1):>8.1f}% {o / model.frame_rate:>9.2f}x")


if __name__ == "__main__":
    main()
