"""Decode-loop throughput, side by side in one run (interleaved repeats, medians):

  own loop vs transformers `generate`   same model, device, dtype, steps, sampling (top-k 250, CFG 3),
                                         whole runs (text encoding included on both sides), interleaved
  steered vs unsteered own loop          2 directions, all layers, gate p = 0.3 and p = 1 (every step);
                                         three live generators stepped in alternating blocks of steps,
                                         so machine noise hits all of them alike

Random-weight models: the architecture and cost are real, the audio is noise (not decoded here).
Usage: python bench/bench_engine.py --models tiny-random,random-small --steps 100 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.utils import logging as hf_logging

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.loop import Generator
from musicrfm.engine.norms import with_layer_norms
from musicrfm.engine.model import load_model
from musicrfm.engine.sampling import SamplingConfig
from musicrfm.engine.steering import DirectionControl, LayerWeighting, SteeringPlan, SteeringSpec

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
    return with_layer_norms(banks[0].merge(banks[1]), model)  # relative strength: the model's typical norms


def time_own(model, steps, plan=None) -> float:
    _sync(model.device)
    t0 = time.perf_counter()
    gen = Generator(model, "lofi piano", sampling=SAMPLING, seed=0, plan=plan)
    gen.run(steps)
    _sync(model.device)
    return steps / (time.perf_counter() - t0)


def steering_overhead(model, plans: dict, steps: int, block: int = 5) -> dict[str, float]:
    """Seconds per step for each plan (None = unsteered), from generators stepped in alternation."""
    gens = {name: Generator(model, "lofi piano", sampling=SAMPLING, seed=0, plan=plan) for name, plan in plans.items()}
    for g in gens.values():
        g.run(2)  # warm-up
    spent = dict.fromkeys(gens, 0.0)
    for _ in range(max(1, steps // block)):
        for name, g in gens.items():
            _sync(model.device)
            t0 = time.perf_counter()
            g.run(block)
            _sync(model.device)
            spent[name] += time.perf_counter() - t0
    return {name: spent[name] / (max(1, steps // block) * block) for name in gens}


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
          f"{'ms/step':>8} {'gate .3':>8} {'gate 1':>8} {'x realtime':>10}")
    for name in args.models.split(","):
        model = load_model(name, device=args.device, dtype=args.dtype)
        bank = random_bank(model)
        controls = (DirectionControl("notes:a", 0.4), DirectionControl("chords:b", 0.3))
        plans = {"plain": None}
        for label, p in (("gate .3", 0.3), ("gate 1", 1.0)):
            spec = SteeringSpec(controls=controls, gate_p=p, layers=LayerWeighting(mode="all"))
            plans[label] = SteeringPlan.compile(spec, bank, model.fingerprint, device=model.device, dtype=model.dtype)
        time_own(model, 5), time_hf(model, 5)  # warm-up (allocator, kernels)
        own, hf = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            own.append(time_own(model, args.steps))
            hf.append(time_hf(model, args.steps))
        o, h = statistics.median(own), statistics.median(hf)
        per_step = steering_overhead(model, plans, args.steps * args.repeats)
        over = {k: 100 * (per_step[k] / per_step["plain"] - 1) for k in ("gate .3", "gate 1")}
        print(f"{name:<14} {model.device.type:<6} {str(model.dtype)[6:]:<9} {o:>9.1f} {h:>9.1f} {o / h:>6.2f}x "
              f"{1000 * per_step['plain']:>8.2f} {over['gate .3']:>7.1f}% {over['gate 1']:>7.1f}% "
              f"{1 / per_step['plain'] / model.frame_rate:>9.2f}x")


if __name__ == "__main__":
    main()
