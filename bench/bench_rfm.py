"""RFM probes: our search (probes.rfm) against the reference procedure, on identical synthetic features.

    python bench/bench_rfm.py                                  # CPU defaults (see docs/probes.md)
    python bench/bench_rfm.py --n-train 5000 --dim 2048 --layers 4 --device cuda

Reference procedure (what the paper's released code does per layer and class): xrfm's `RFM` with a
Laplace kernel, 15 iterations, early stopping and best-iteration selection on validation AUC, from a
100-trial random search over the paper's ranges (App. B), one binary one-vs-rest probe per class; its
validation AUC is computed from `predict_proba` (xrfm clamps those to [1e-3, 0.999]); the kept trial's
AGOP gives the direction. Ours: `musicrfm.probes.rfm.fit_binary_directions` (one shared search per layer,
successive halving, see that module). Both get the same standardised features, so the bandwidth range
means the same to both.

Printed as a markdown table, per layer and in total: wall time, speed-up, mean validation AUC and mean
test AUC (a held-out split neither search saw: the honest comparison, since the best of more candidates
has a higher validation AUC by selection alone; for the reference both from predict_proba, as it selects,
and from its raw outputs), mean |cos| between the two methods' directions, and the test AUC of the bare
projection x . direction of ours (> 0.5: the sign convention holds on held-out data).

If --ref-classes is below --classes, the reference runs on the first classes only and its time is
extrapolated with the formula printed in the output (time per class x classes); AUCs are then compared
on those classes only.

Features ("synthetic but realistic", stand-ins for mean-pooled MusicGen states; no weights here):
labels are pitch classes; each layer embeds in d dimensions, through its own random rotation, a
pitch-class helix (harmonics 1, 5 and 7 of the class angle, as the circle of fifths would give) scaled
by an instrument-dependent gain, a pitch-height coordinate, an instrument embedding (16 instruments),
anisotropic noise with a power-law spectrum and two high-variance "massive activation" coordinates.
Signal-to-noise grows with the layer index. The class signal is non-linear (gain x helix), so kernels
beat linear probes on it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch


from musicrfm.probes.baselines import fit_linear_directions  # noqa: E402
from musicrfm.probes.rfm import FeatureMap, SearchConfig, fit_binary_directions, roc_auc  # noqa: E402


@dataclass
class Split:
    X_tr: torch.Tensor
    y_tr: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_te: torch.Tensor
    y_te: torch.Tensor


@dataclass
class MethodResult:
    seconds: float
    val_auc: list[float]  # per class
    test_auc: list[float]
    directions: list[torch.Tensor]  # per class, unit, original feature space
    test_auc_raw: list[float] | None = None  # reference only: from its raw KRR outputs, not predict_proba


def make_layers(n: int, d: int, classes: int, layers: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Labels [n] and one float16 feature matrix [n, d] per layer (stored like extracted features)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    instrument = torch.randint(0, 16, (n,), generator=g)
    octave = torch.randint(0, 7, (n,), generator=g).double()
    gain = 0.4 + 1.2 * torch.rand(16, generator=g, dtype=torch.float64)
    angle = 2 * math.pi * labels.double() / classes
    helix = torch.cat([torch.stack([torch.cos(h * angle), torch.sin(h * angle)], 1) for h in (1, 5, 7)], 1)
    height = (octave * classes + labels.double()) / classes  # pitch height, mostly octave
    instrument_codes = 3.0 * torch.randn(16, 24, generator=g, dtype=torch.float64)
    out = []
    for layer in range(layers):
        snr = 0.8 + 0.5 * layer / max(layers - 1, 1)
        signal = torch.cat([snr * gain[instrument][:, None] * helix, 0.5 * height[:, None],
                            instrument_codes[instrument]], 1)  # [n, 31]
        spectrum = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.5)
        # Per-coordinate RMS 1 overall; the signal sits a quarter in, where the noise std is about 0.7-0.8.
        noise = torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum * (math.sqrt(d) / spectrum.norm())
        noise[:, :2] *= 8.0  # massive activations: two coordinates with large, uninformative variance
        coords = noise
        start = min(d - signal.shape[1], int(d * 0.25))
        coords[:, start:start + signal.shape[1]] += signal
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        out.append((coords @ rotation.T + 0.5).to(torch.float16))
    return labels, out


def split(X: torch.Tensor, y: torch.Tensor, n_tr: int, n_val: int) -> Split:
    return Split(X[:n_tr], y[:n_tr], X[n_tr:n_tr + n_val], y[n_tr:n_tr + n_val], X[n_tr + n_val:], y[n_tr + n_val:])


def run_ours(s: Split, classes: int, search: SearchConfig, device: str) -> MethodResult:
    sync(device)
    start = time.perf_counter()
    results = fit_binary_directions(s.X_tr.to(device), s.y_tr, s.X_val.to(device), s.y_val, classes, search,
                                    keep_predictors=True)
    sync(device)
    seconds = time.perf_counter() - start
    test_auc = []
    for r in results:
        scores = r.predictor.scores(s.X_te.to(device))[:, r.output_index]
        test_auc.append(float(roc_auc(scores.cpu(), s.y_te == r.class_index)))
    return MethodResult(seconds, [r.val_auc for r in results], test_auc, [r.direction.cpu() for r in results])


def run_ours_per_class(s: Split, classes: int, search: SearchConfig, device: str) -> MethodResult:
    """Ablation: one binary search per class, so each class learns its own M (as the reference does)."""
    sync(device)
    start = time.perf_counter()
    results = [fit_binary_directions(s.X_tr.to(device), (s.y_tr == c).long(), s.X_val.to(device),
                                     (s.y_val == c).long(), 2, search, keep_predictors=True)[1]
               for c in range(classes)]
    sync(device)
    seconds = time.perf_counter() - start
    test_auc = [float(roc_auc(r.predictor.scores(s.X_te.to(device))[:, r.output_index].cpu(), s.y_te == c))
                for c, r in enumerate(results)]
    return MethodResult(seconds, [r.val_auc for r in results], test_auc, [r.direction.cpu() for r in results])


def run_linear(s: Split, classes: int, device: str) -> MethodResult:
    """Ablation: the linear ridge (MSE) probe of probes.baselines, AUCs from x . w."""
    start = time.perf_counter()
    results = fit_linear_directions(s.X_tr.to(device), s.y_tr, s.X_val.to(device), s.y_val, classes)
    seconds = time.perf_counter() - start
    test_auc = [float(roc_auc(s.X_te.float() @ r.direction.cpu(), s.y_te == r.class_index)) for r in results]
    return MethodResult(seconds, [r.val_auc for r in results], test_auc, [r.direction.cpu() for r in results])


def run_reference(s: Split, class_ids: list[int], trials: int, seed: int, device: str) -> MethodResult:
    """The reference procedure: one xrfm RFM random search of `trials` trials per class."""
    import numpy as np
    from xrfm import RFM
    from xrfm.rfm_src.class_conversion import ClassificationConverter
    from xrfm.rfm_src.kernels import LaplaceKernel

    # Same coordinates as ours (centred, RMS distance 10): the search ranges mean the same to both.
    fmap = FeatureMap.fit(s.X_tr.float())
    X_tr, X_val, X_te = (fmap.standardise(x.float()).to(device) for x in (s.X_tr, s.X_val, s.X_te))
    sync(device)
    start = time.perf_counter()
    val_auc, test_auc, test_auc_raw, directions = [], [], [], []
    for c in class_ids:
        y_tr = (s.y_tr == c).float()[:, None].to(device)
        y_val = (s.y_val == c).float()[:, None].to(device)
        rng = np.random.default_rng(seed + 1000 * c)
        best, best_auc = None, -1.0
        for _ in range(trials):
            bandwidth = float(np.exp(rng.uniform(np.log(1.0), np.log(100.0))))
            reg = float(np.exp(rng.uniform(np.log(1e-5), np.log(10.0))))
            exponent = float(rng.uniform(0.7, 1.4))
            center = bool(rng.integers(2))
            model = RFM(kernel=LaplaceKernel(bandwidth=bandwidth, exponent=exponent), iters=15, device=device,
                        tuning_metric="auc", verbose=False, class_converter=ClassificationConverter("zero_one", 2))
            model.fit((X_tr, y_tr), (X_val, y_val), iters=15, reg=reg, center_grads=center, early_stop_rfm=True)
            auc = float(roc_auc(model.predict_proba(X_val)[:, 1].cpu(), s.y_val == c))
            if auc > best_auc:
                best, best_auc = model, auc
        agop = best.fit_M(X_tr, 1, inplace=False)  # the kept trial's AGOP -> its direction
        directions.append(torch.linalg.eigh(agop.double())[1][:, -1].float().cpu())
        val_auc.append(best_auc)
        test_auc.append(float(roc_auc(best.predict_proba(X_te)[:, 1].cpu(), s.y_te == c)))
        test_auc_raw.append(float(roc_auc(best.predict(X_te)[:, 0].cpu(), s.y_te == c)))
    sync(device)
    return MethodResult(time.perf_counter() - start, val_auc, test_auc, directions, test_auc_raw)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=250)
    ap.add_argument("--n-test", type=int, default=250)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=100, help="our search's trials")
    ap.add_argument("--halving", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--ref-trials", type=int, default=100, help="the reference's trials per (layer, class)")
    ap.add_argument("--ref-classes", type=int, default=None, help="run the reference on the first K classes only")
    ap.add_argument("--no-reference", action="store_true", help="time ours only")
    ap.add_argument("--ablations", action="store_true",
                    help="also run ours without successive halving and with one search (own M) per class, "
                         "and the linear ridge probe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref_classes = list(range(min(args.ref_classes or args.classes, args.classes)))

    print(f"# bench_rfm  {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"features: n_train {args.n_train}, n_val {args.n_val}, n_test {args.n_test}, d {args.dim}, "
          f"{args.classes} classes, {args.layers} layers (synthetic helix + nuisance, float16)")
    search = SearchConfig(trials=args.trials, seed=args.seed, halving=args.halving, iterations=args.iterations)
    print(f"ours: {search}")
    if not args.no_reference:
        print(f"reference: xrfm RFM, {args.ref_trials} trials x {len(ref_classes)} of {args.classes} classes per "
              f"layer, 15 iterations")
    labels, layers = make_layers(args.n_train + args.n_val + args.n_test, args.dim, args.classes, args.layers,
                                 args.seed)
    rows, ablations = [], []
    for index, X in enumerate(layers):
        s = split(X, labels, args.n_train, args.n_val)
        ours = run_ours(s, args.classes, search, args.device)
        if args.ablations:
            plain = run_ours(s, args.classes, replace(search, halving=1), args.device)
            own = run_ours_per_class(s, args.classes, search, args.device)
            linear = run_linear(s, args.classes, args.device)
            for name, r in (("ours (default)", ours), ("ours, no successive halving", plain),
                            ("ours, one search per class (own M, like the reference)", own),
                            ("linear ridge probe (baselines.fit_linear_directions)", linear)):
                ablations.append(f"| {index} | {name} | {r.seconds:.1f} | {mean(r.val_auc):.4f} | "
                                 f"{mean(r.test_auc):.4f} |")
        ref = None if args.no_reference else run_reference(s, ref_classes, args.ref_trials, args.seed, args.device)
        rows.append(summarise(str(index), [ours], [ref], ref_classes, args.classes, s.X_te, s.y_te))
        done = f"layer {index} done: ours {ours.seconds:.1f} s"
        print(done if ref is None else f"{done}, reference {ref.seconds:.1f} s", flush=True)
    print_table(rows, ref_classes, args.classes)
    if ablations:
        print("\n| layer | variant | s | mean val AUC | mean test AUC |\n|---|---|---|---|---|")
        print("\n".join(ablations))


def summarise(name: str, ours: list[MethodResult], refs: list[MethodResult | None], ref_classes: list[int],
              n_classes: int, X_te: torch.Tensor, y_te: torch.Tensor) -> dict:
    """One table row: ours on every class; the reference and the comparison on the classes it ran."""
    row = {"layer": name, "ours_s": ours[0].seconds, "ours_val": mean(ours[0].val_auc),
           "ours_test": mean(ours[0].test_auc),
           "ours_proj": mean([float(roc_auc((X_te.float() @ q), y_te == c)) for c, q in enumerate(ours[0].directions)])}
    ref = refs[0]
    if ref is not None:
        row.update(ref_s=ref.seconds * n_classes / len(ref_classes), ref_runs=len(ref_classes),
                   ref_raw_s=ref.seconds, ours_val_common=mean([ours[0].val_auc[c] for c in ref_classes]),
                   ours_test_common=mean([ours[0].test_auc[c] for c in ref_classes]), ref_val=mean(ref.val_auc),
                   ref_test=mean(ref.test_auc), ref_test_raw=mean(ref.test_auc_raw),
                   cos=mean([abs(float(ours[0].directions[c] @ q)) for c, q in zip(ref_classes, ref.directions)]))
    return row


def print_table(rows: list[dict], ref_classes: list[int], n_classes: int) -> None:
    if len(rows) > 1:  # totals: times add up, AUCs average over layers (every layer has the same classes)
        total = {"layer": "all", "ours_s": sum(r["ours_s"] for r in rows)}
        for key in rows[0]:
            if key not in ("layer", "ours_s", "ref_s", "ref_raw_s", "ref_runs"):
                total[key] = mean([r[key] for r in rows])
        if "ref_s" in rows[0]:
            total.update(ref_s=sum(r["ref_s"] for r in rows), ref_raw_s=sum(r["ref_raw_s"] for r in rows),
                         ref_runs=sum(r["ref_runs"] for r in rows))
        rows = rows + [total]
    print()
    if "ref_s" not in rows[0]:
        print("| layer | ours s | val AUC | test AUC | test AUC of x . direction |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['ours_s']:.1f} | {r['ours_val']:.4f} | {r['ours_test']:.4f} | "
                  f"{r['ours_proj']:.4f} |")
        return
    print("| layer | ours s | reference s | speed-up | val AUC ours / ref | test AUC ours / ref "
          "(proba) / ref (raw scores) | mean abs cos(ours, ref) | test AUC of x . direction (ours) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['ours_s']:.1f} | {r['ref_s']:.1f} | {r['ref_s'] / r['ours_s']:.1f}x | "
              f"{r['ours_val_common']:.4f} / {r['ref_val']:.4f} | {r['ours_test_common']:.4f} / "
              f"{r['ref_test']:.4f} / {r['ref_test_raw']:.4f} | {r['cos']:.3f} | {r['ours_proj']:.4f} |")
    if len(ref_classes) < n_classes:
        print(f"\nreference s is EXTRAPOLATED: measured seconds on the first {len(ref_classes)} classes x "
              f"{n_classes} / {len(ref_classes)} (time per class is about constant); AUCs and cos compare the "
              f"{len(ref_classes)} classes both ran; ours s is measured on all {n_classes} classes.")
    else:
        print("\nall times measured (no extrapolation); AUCs are means over every (layer, class) probe.")


if __name__ == "__main__":
    main()
