"""Feature-extraction throughput (clips/s): EnCodec encode + one decoder pass over BOS and the delayed
codes + pooling, for 4 s clips, as `musicrfm extract` runs it (random-weight models; the cost is real).

Usage: python bench/bench_extract.py --models tiny-random,random-small --clips 32 --batch-size 8
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.utils import logging as hf_logging

from musicrfm.engine.model import load_model
from musicrfm.probes.extract import decoder_features, encode_audio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-random,random-small")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    print(f"{'model':<14} {'device':<6} {'dtype':<9} {'batch':>5} {'encode s':>9} {'decoder s':>9} {'clips/s':>8}")
    for name in args.models.split(","):
        model = load_model(name, device=args.device, dtype=args.dtype)
        g = torch.Generator().manual_seed(0)
        audio = 0.3 * torch.randn(args.batch_size, int(args.seconds * model.sample_rate), generator=g)
        decoder_features(model, encode_audio(model, audio[:1, : model.sample_rate]))  # warm-up
        t_enc = t_dec = 0.0
        batches = max(1, args.clips // args.batch_size)
        for _ in range(batches):
            t0 = time.perf_counter()
            codes = encode_audio(model, audio)
            t1 = time.perf_counter()
            decoder_features(model, codes)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            t_enc, t_dec = t_enc + t1 - t0, t_dec + t2 - t1
        clips = batches * args.batch_size
        print(f"{name:<14} {model.device.type:<6} {str(model.dtype)[6:]:<9} {args.batch_size:>5} {t_enc:>9.2f} "
              f"{t_dec:>9.2f} {clips / (t_enc + t_dec):>8.2f}")


if __name__ == "__main__":
    main()
