"""A sweep's outputs from its stored records: results per group (FD, MMD², CLAP, check and probe accuracy),
per-clip rows, mean traces, and the files `results.csv`, `clips.csv`, `traces.csv`, `metrics.png`,
`traces.png` and `summary.md` (docs/evaluation.md). Reads records only, so a rerun rewrites the same files.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicrfm.engine.model import NOISE_LABEL

from .measure import CHECKS, FittedProbe, check_name
from .presets import PAPER, REFERENCE, REFERENCE_GROUP, Configuration, SweepSettings

__all__ = ["CLIP_COLUMNS", "RESULT_COLUMNS", "SweepReport", "aggregate"]


@dataclass
class SweepReport:
    out: Path
    rows: list[dict]  # results.csv
    clip_rows: list[dict]  # clips.csv
    files: dict[str, Path]
    random_weights: bool


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _per_class_mean(pairs: list[tuple[str, bool]]) -> float | None:
    """Mean over classes of the per-class accuracy (the paper's "mean per-class")."""
    if not pairs:
        return None
    by: dict[str, list[bool]] = {}
    for cls, ok in pairs:
        by.setdefault(cls, []).append(ok)
    return float(np.mean([np.mean(v) for v in by.values()]))


RESULT_COLUMNS = ["preset", "group", "concept", "role", "x", "units", "vector_norm", "configurations", "n_clips",
                  "embedding", "n_ref",
                  "fd", "mmd2", "mmd_bandwidth", "clap", "check", "check_acc", "check_n", "probe_acc",
                  "probe_p_target", "probe_layer", "probe_n", "bpm", "bpm_shift_up", "bpm_shift_down",
                  "probe_bpm", "probe_bpm_shift_up", "probe_bpm_shift_down", "note"]
# vector_norm: the mean over layers of the norm each target's direction adds at full schedule with the gate open,
# in hidden-state units (the unit sidecar's `vector_norms`): what the strength `x` meant on this model.
# bpm (tempos only): the median tempo the independent check (audio_checks.estimate_tempo) reads in the row's clips;
# bpm_shift_up / bpm_shift_down: the median change from the same sample's unsteered clip (same prompt and seed)
# over the clips steered with a positive / negative coefficient. Medians, because a tempo read is off by an
# octave now and then. probe_bpm*: the same from the tempo regressor (with --features holding tempo features).
CLIP_COLUMNS = ["preset", "config", "sample", "prompt", "seed", "concept", "class", "coefficient", "units",
                "vector_norm", "role", "window",
                "check_pred", "check_correct", "check_bpm", "probe_pred", "probe_correct", "probe_p_target",
                "probe_bpm", "clap", "tokens_sha256", "note"]


def _vector_norm(record: dict, target: dict) -> float | None:
    """The mean over layers of what the target's direction added at full strength (None: unsteered, or a record
    from before sweeps kept it)."""
    norms = (record.get("vector_norms") or {}).get(f"{target['concept']}:{target['class']}")
    return float(np.mean(norms)) if norms else None


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else None


def _bpm_columns(targets: list[tuple[int, dict]], ref_bpm: dict[int, float], source: str = "check") -> dict:
    """bpm, bpm_shift_up, bpm_shift_down of a row from its (sample, target) pairs (see RESULT_COLUMNS), as the
    independent check (`source` "check") or the tempo regressor ("probe": probe_bpm, ...) read them; empty for
    concepts without a BPM."""
    reads = [(i, t, t[source]["bpm"]) for i, t in targets if t.get(source) is not None and "bpm" in t[source]]
    if not reads:
        return {}
    prefix = "probe_" if source == "probe" else ""

    def shift(sign: float) -> float | None:
        return _median([bpm - ref_bpm[i] for i, t, bpm in reads if np.sign(t["coefficient"]) == sign and i in ref_bpm])

    return {f"{prefix}bpm": _median([bpm for _, _, bpm in reads]), f"{prefix}bpm_shift_up": shift(1.0),
            f"{prefix}bpm_shift_down": shift(-1.0)}


def _units(clips: list[dict], settings: SweepSettings) -> str:
    """The strength units the clips were steered in: their own spec's (a methods-preset configuration sets its
    own), else the sweep's."""
    specs = [r["steering"] for r in clips if r.get("steering")]
    return specs[0].get("units", settings.units) if specs else settings.units


def methods_table(rows: list[dict]) -> list[str]:
    """The methods preset's results side by side (Markdown lines): per concept and matched strength m, MusicRFM's
    and the linear-probe method's closed-loop check accuracy, FD and MMD², then the crossed configurations'
    check accuracy and FD; the unsteered reference first."""
    methods = {"musicrfm": " musicrfm m=", "linear-probe": " linear-probe m=",
               "linear bank, musicrfm steering": "crossed: linear bank, musicrfm steering m=",
               "rfm bank, linear-probe steering": "crossed: rfm bank, linear-probe steering m="}
    by: dict[tuple[str, float], dict[str, dict]] = {}
    reference = {r["concept"]: r for r in rows if r["group"] == REFERENCE_GROUP}
    for r in rows:
        for method, marker in methods.items():
            if marker in r["group"]:
                by.setdefault((r["concept"], _num(r["x"])), {})[method] = r
    if not by:
        return []
    cells = [("musicrfm", "check_acc"), ("musicrfm", "fd"), ("musicrfm", "mmd2"), ("linear-probe", "check_acc"),
             ("linear-probe", "fd"), ("linear-probe", "mmd2"), ("linear bank, musicrfm steering", "check_acc"),
             ("linear bank, musicrfm steering", "fd"), ("rfm bank, linear-probe steering", "check_acc"),
             ("rfm bank, linear-probe steering", "fd")]
    names = {"check_acc": "check acc", "fd": "FD", "mmd2": "MMD²"}
    lines = ["| concept | m | " + " | ".join(f"{m} {names[k]}" for m, k in cells) + " |",
             "|---|---|" + "---|" * len(cells)]
    for concept, ref in reference.items():
        lines.append(f"| {concept} | 0 (unsteered) | " + " | ".join(
            _md(ref["check_acc"]) if k == "check_acc" else "–" for _, k in cells) + " |")
    for (concept, m), found in by.items():
        lines.append(f"| {concept} | {m:g} | " + " | ".join(_md(found.get(method, {}).get(k)) for method, k in cells)
                     + " |")
    return lines


def aggregate(settings: SweepSettings, configs: Sequence[Configuration], records: dict[str, dict],
              probes: dict[str, FittedProbe], probe_missing: dict[str, str]) -> SweepReport:
    """Results per (group, concept, role) from the stored records, then every output file."""
    from .metrics import RBFKernel, frechet_distance, mmd2_unbiased

    out = Path(settings.out)
    order = {REFERENCE: -1, **{c.name: i for i, c in enumerate(configs)}}
    recs = sorted((r for r in records.values() if r["config"] in order and r["sample"] < settings.samples),
                  key=lambda r: (order[r["config"]], r["sample"]))
    random_weights = any(r["random_weights"] for r in recs)
    note = NOISE_LABEL if random_weights else ""
    ref = [r for r in recs if r["config"] == REFERENCE]
    ref_emb = np.array([r["embedding"] for r in ref]) if ref else None
    kernel = RBFKernel.from_reference(ref_emb) if ref_emb is not None and len(ref_emb) >= 2 else None
    embedder = settings.embedder_name

    ref_bpm, ref_probe_bpm = ({r["sample"]: t[source]["bpm"] for r in ref for t in r["targets"]
                               if t.get(source) is not None and "bpm" in t[source]} for source in ("check", "probe"))
    groups: dict[tuple[str, str, str], dict] = {}
    for r in recs:
        for t in r["targets"]:
            key = (t["group"], t["concept"], t["role"])
            g = groups.setdefault(key, {"x": t["x"], "configs": [], "records": {}, "targets": [], "samples": []})
            if r["config"] not in g["configs"]:
                g["configs"].append(r["config"])
            g["records"][r["unit"]] = r
            g["targets"].append(t)
            g["samples"].append(r["sample"])
    keys = list(groups)
    if settings.preset == "pairs":  # Table 5's layout: by attribute, then eta0
        concept_order = {c: i for i, c in enumerate(dict.fromkeys(k[1] for k in keys))}
        keys.sort(key=lambda k: (k[0] != REFERENCE_GROUP, concept_order[k[1]], _num(groups[k]["x"])))
    rows = []
    for key in keys:
        (group, concept, role), g = key, groups[key]
        clips = list(g["records"].values())
        emb = np.array([r["embedding"] for r in clips])
        fd = mmd = None
        if group != REFERENCE_GROUP and kernel is not None and len(emb) >= 2:
            fd = frechet_distance(ref_emb, emb)
            mmd = mmd2_unbiased(ref_emb, emb, kernel)
        claps = [r["clap"] for r in clips if r["clap"] is not None]
        # a regression's check (tempo) reads a value, not a class: it has no accuracy
        checks = [(t["class"], t["check"]["correct"]) for t in g["targets"]
                  if t["check"] is not None and t["check"]["correct"] is not None]
        probed = [t for t in g["targets"] if t["probe"] is not None and t["probe"]["correct"] is not None]
        probe = probes.get(concept)
        added = [v for r in clips for t in r["targets"] if t["concept"] == concept and t["role"] == role
                 for v in [_vector_norm(r, t)] if v is not None]
        rows.append({
            "preset": settings.preset, "group": group, "concept": concept, "role": role, "x": g["x"],
            "units": _units(clips, settings), "vector_norm": float(np.mean(added)) if added else None,
            "configurations": ";".join(g["configs"]), "n_clips": len(clips), "embedding": embedder,
            "n_ref": len(ref), "fd": fd, "mmd2": mmd, "mmd_bandwidth": kernel.bandwidth if kernel else None,
            "clap": float(np.mean(claps)) if claps else "unavailable",
            "check": check_name(concept) or "none", "check_acc": _per_class_mean(checks), "check_n": len(checks),
            "probe_acc": (_per_class_mean([(t["class"], t["probe"]["correct"]) for t in probed]) if probed
                          else probe_missing.get(concept, "unavailable")),
            "probe_p_target": float(np.mean([t["probe"]["p_target"] for t in probed])) if probed else None,
            "probe_layer": probe.layer if probe is not None else None, "probe_n": len(probed),
            **_bpm_columns(list(zip(g["samples"], g["targets"])), ref_bpm),
            **_bpm_columns(list(zip(g["samples"], g["targets"])), ref_probe_bpm, source="probe"), "note": note,
        })
    clip_rows = []
    for r in recs:
        for t in r["targets"]:
            c, p = t["check"], t["probe"]
            clip_rows.append({
                "preset": settings.preset, "config": r["config"], "sample": r["sample"], "prompt": r["prompt"],
                "seed": r["seed"], "concept": t["concept"], "class": t["class"], "coefficient": t["coefficient"],
                "units": _units([r], settings), "vector_norm": _vector_norm(r, t),
                "role": t["role"], "window": "-".join(_fmt(float(w)) for w in t["window"]),
                "check_pred": c["pred"] if c else "", "check_correct": c["correct"] if c else None,
                "check_bpm": c.get("bpm") if c else None,
                "probe_pred": p["pred"] if p else "", "probe_correct": p["correct"] if p else None,
                "probe_p_target": p["p_target"] if p else None, "probe_bpm": p.get("bpm") if p else None,
                "clap": r["clap"] if r["clap"] is not None else "unavailable",
                "tokens_sha256": r["tokens_sha256"], "note": note})
    traces = _mean_traces(recs)
    files = {"results": out / "results.csv", "clips": out / "clips.csv", "summary": out / "summary.md"}
    _write_csv(files["results"], RESULT_COLUMNS, rows)
    _write_csv(files["clips"], CLIP_COLUMNS, clip_rows)
    if traces:
        files["traces"] = out / "traces.csv"
        _write_csv(files["traces"], ["preset", "config", "source", "series", "t", "mean", "n", "note"],
                   [{"preset": settings.preset, "note": note, **row} for row in traces])
    plot = _plot_metrics(out / "metrics.png", settings, rows, note)
    if plot:
        files["metrics_png"] = plot
    tempo_plot = _plot_tempo(out / "tempo.png", settings, rows, note)
    if tempo_plot:
        files["tempo_png"] = tempo_plot
    if traces:
        tplot = _plot_traces(out / "traces.png", settings, traces, note, probes)
        if tplot:
            files["traces_png"] = tplot
    _write_summary(files["summary"], settings, configs, rows, probes, probe_missing, note, files,
                   done=len(recs), total=settings.samples * (len(configs) + 1),
                   dim=len(recs[0]["embedding"]) if recs else None)
    return SweepReport(out, rows, clip_rows, files, random_weights)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in columns])
    os.replace(tmp, path)


def _mean_traces(recs: list[dict]) -> list[dict]:
    """Mean trace over samples per (configuration, source, series) at each window time."""
    acc: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for r in recs:
        tr = r.get("trace")
        if not tr:
            continue
        for source in ("probe", "check"):
            for series, values in tr[source].items():
                slot = acc.setdefault((r["config"], source, series), {})
                for t, v in zip(tr["t"], values):
                    slot.setdefault(t, []).append(v)
    rows = []
    for (config, source, series), by_t in acc.items():
        for t in sorted(by_t):
            rows.append({"config": config, "source": source, "series": series, "t": t,
                         "mean": float(np.mean(by_t[t])), "n": len(by_t[t])})
    return rows


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:  # plots are a convenience; the CSVs hold the same numbers
        return None


def _num(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else float("nan")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


def metrics_figure(settings: SweepSettings, rows: list[dict], note: str):
    """FD, MMD², CLAP and accuracy per group: against eta0 (the paper's Fig. 2) or K or p where the preset
    has a numeric axis, else one point per configuration. Without any CLAP score the CLAP panel is left out
    (the title says why). None without matplotlib."""
    plt = _matplotlib()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    steered = [r for r in rows if r["group"] != REFERENCE_GROUP]
    numeric = all(r["x"] is not None for r in steered)
    tempo = any(r["concept"] == "tempos" for r in steered)  # its eta0 is signed: the plot pools |eta0|
    xlabel = {"eta": "control coefficient eta0" + (" (|eta0| for tempos)" if tempo else ""),
              "pairs": "eta0 of the attribute", "topk": "K (layers steered)",
              "gate": "gate probability p", "methods": "matched strength m (push per step, fraction of the norm)"
              }.get(settings.preset, "configuration")
    labels = list(dict.fromkeys(r["group"] for r in steered))
    use_probe = any(isinstance(r["probe_acc"], float) for r in steered)
    has_clap = any(isinstance(r["clap"], float) for r in steered)
    panels = [("fd", f"FD ({settings.embedder_name}) lower = closer"), ("mmd2", "MMD² (unbiased) lower = closer")]
    if has_clap:
        panels.append(("clap", "CLAP score vs prompt"))
    panels.append(("probe_acc" if use_probe else "check_acc",
                   "probe accuracy (mean per class)" if use_probe else "independent check accuracy (mean per class)"))
    shape = (2, 2) if len(panels) == 4 else (1, len(panels))
    fig, axes = plt.subplots(*shape, figsize=(10, 7) if len(panels) == 4 else (14, 4.6), dpi=110, squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in steered:
            name = r["concept"] + (f" ({r['role']})" if r["role"] else "")
            if settings.preset == "methods":  # one line per method (the group without its " m=..." suffix)
                name = r["group"].rsplit(" m=", 1)[0]
            x = r["x"] if numeric else labels.index(r["group"])
            series.setdefault(name, []).append((x, _num(r[key])))
        for name, pts in list(series.items()):
            if all(math.isnan(p[1]) for p in pts):
                del series[name]
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ref_rows = [r for r in rows if r["group"] == REFERENCE_GROUP]
        if key in ("clap", "check_acc", "probe_acc"):
            for r in ref_rows:
                if isinstance(r[key], float):
                    ax.axhline(r[key], ls="--", lw=1, color="grey")
        ax.set_title(title, fontsize=9)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        else:
            ax.set_xlabel(xlabel, fontsize=8)
            if settings.preset == "topk":  # K counts layers: whole numbers only
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="best", framealpha=0.85, fontsize=7)
    why_no_clap = "" if has_clap else ("\nno CLAP panel: " + ("no CLAP weights supplied (--clap)" if not settings.clap
                                                              else "no clip got a CLAP score"))
    fig.suptitle(f"musicrfm sweep {settings.preset}: {PAPER[settings.preset]}; {settings.model}, "
                 f"{settings.samples} samples x {settings.seconds:g} s" + (f"\n[{note}]" if note else "")
                 + "\n(dashed: unsteered reference)" + why_no_clap, fontsize=9)
    fig.tight_layout()
    return fig


def _plot_metrics(path: Path, settings: SweepSettings, rows: list[dict], note: str) -> Path | None:
    fig = metrics_figure(settings, rows, note)
    return None if fig is None else _save(fig, path)


def _plot_tempo(path: Path, settings: SweepSettings, rows: list[dict], note: str) -> Path | None:
    """BPM shift vs strength for tempo rows (the independent tempo check, up and down); None without tempo rows
    with a numeric strength, or without matplotlib."""
    steered = [r for r in rows if r["group"] != REFERENCE_GROUP and r["x"] is not None
               and (r.get("bpm") is not None or r.get("probe_bpm") is not None)]
    plt = _matplotlib()
    if not steered or plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for prefix, reader, style in (("", "check", "-"), ("probe_", "tempo regressor", ":")):
        for direction, label in (("up", "steered up (+eta0)"), ("down", "steered down (-eta0)")):
            key = f"{prefix}bpm_shift_{direction}"
            pts = sorted((r["x"], r[key]) for r in steered if r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=style, marker="o", label=f"{reader}: {label}")
    ax.axhline(0.0, ls="--", lw=1, color="grey")
    ax.set_xlabel("|eta0|" if settings.preset == "eta" else "strength", fontsize=8)
    ax.set_ylabel("median BPM change vs the same seed unsteered")
    ax.set_title(f"tempo: the independent check (estimate_tempo), solid; the regressor, dotted; {settings.model}"
                 + (f"\n[{note}]" if note else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.85, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def traces_figure(settings: SweepSettings, traces: list[dict], note: str, probes: dict[str, FittedProbe]):
    """Fig. 1: the probe softmax of the target class over time per schedule (a), or of n1 and n2 for the
    crossfade (b); beside it the independent check's pitch-class share (notes). None without matplotlib."""
    plt = _matplotlib()
    if plt is None:
        return None
    sources = [s for s in ("probe", "check") if any(t["source"] == s for t in traces)]
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4), dpi=110, squeeze=False)
    for ax, source in zip(axes[0], sources):
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for t in traces:
            if t["source"] == source:
                lines.setdefault((t["config"], t["series"]), []).append((t["t"], t["mean"]))
        for (config, series), pts in lines.items():
            style = {"ls": "--", "color": "grey"} if config == REFERENCE else {}
            label = config if series == "target" else f"{config}: {series}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        if source == "probe":
            layers = ", ".join(f"{c} layer {p.layer}" for c, p in probes.items())
            ax.set_title(f"probe softmax of the steered class ({layers})", fontsize=9)
            ax.set_ylabel("probability")
        else:
            ax.set_title("independent check: pitch-class share of the steered class", fontsize=9)
            ax.set_ylabel("share of the pitch-class profile")
        ax.set_xlabel(f"time (s), {settings.window:g} s windows every {settings.hop:g} s")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", framealpha=0.85, fontsize=7)
    fig.suptitle(f"musicrfm sweep {settings.preset}: {PAPER[settings.preset]}; mean of {settings.samples} samples"
                 + (f" [{note}]" if note else ""), fontsize=9)
    fig.tight_layout()
    return fig


def _plot_traces(path: Path, settings: SweepSettings, traces: list[dict], note: str,
                 probes: dict[str, FittedProbe]) -> Path | None:
    fig = traces_figure(settings, traces, note, probes)
    return None if fig is None else _save(fig, path)


def _md(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")  # a table cell: "tempos |eta0|=0.30" must not split the row


def _write_summary(path: Path, settings: SweepSettings, configs: Sequence[Configuration], rows: list[dict],
                   probes: dict[str, FittedProbe], probe_missing: dict[str, str], note: str,
                   files: dict[str, Path], done: int, total: int, dim: int | None) -> None:
    lines = [f"# Sweep `{settings.preset}`: {PAPER[settings.preset]}", ""]
    if note:
        lines += [(f"**{note}.** The model ({settings.model}) has random weights: every clip is noise, and these "
                   "numbers test the pipeline, not steering."), ""]
    clap = f"CLAP score vs the prompt with `{settings.clap}`" if settings.clap else \
        "CLAP score: unavailable (no CLAP weights supplied; never estimated from another embedding)"
    lines += [
        (f"- model `{settings.model}`; banks {', '.join(f'`{Path(b).name}`' for b in settings.banks)}; "
         f"concepts {', '.join(settings.concepts)}"),
        f"- {settings.samples} samples per configuration x {settings.seconds:g} s; prompts cycled: "
        + "; ".join(f"\"{p}\"" for p in settings.prompts) + f"; seed {settings.seed}",
        f"- units stored: {done} of {total}",
        (f"- strength (eta0 / x) in **{settings.units}** units"
         + (": a fraction of each layer's typical activation norm (`vector_norm` in results.csv: the norm added, "
            "in hidden-state units)" if settings.units == "relative" else ": hidden-state units, as the paper")
         + (f"; layer weighting `{settings.layers}`" if settings.layers else "")
         + ("; except where a configuration sets its own (methods: the linear-probe rows are raw alpha, see "
            "Configurations and the `units` column)" if settings.preset == "methods" else "")),
        f"- FD and unbiased MMD² against the unsteered reference (same prompts and seeds), embedding "
        f"**{settings.embedder_name}**, RBF bandwidth frozen from the reference (median heuristic)"
        + ("; this embedding is not CLAP: values are comparable only within this embedding" if not settings.clap else ""),
        f"- {clap}",
    ]
    for c, p in probes.items():
        lines.append(f"- probe accuracy ({c}): {p.describe()}; features re-extracted from the generated audio")
    for c, reason in probe_missing.items():
        lines.append(f"- probe accuracy ({c}): {reason}")
    lines.append("- independent checks: " + "; ".join(f"{c}: {n}" for c, n in CHECKS.items())
                 + "; other concepts have none")
    if dim is not None and settings.samples <= dim:
        lines.append(f"- FD with n = {settings.samples} clips per set in d = {dim} dimensions: the covariance is "
                     f"singular for n <= d and FD is then mostly bias; compare rows at equal n only")
    lines += ["", "| group | concept | role | n | FD | MMD² | CLAP | check acc | probe acc | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_md(r[k]) for k in ("group", "concept", "role", "n_clips", "fd", "mmd2", "clap",
                                                           "check_acc", "probe_acc", "note")) + " |")
    tempo_rows = [r for r in rows if r.get("bpm") is not None or r.get("probe_bpm") is not None]
    if tempo_rows:
        lines += ["", "Tempo read by the independent check (`estimate_tempo`) and, with tempo features, by the tempo "
                  "regressor (probe): median BPM of the clips, and the median change from the same sample's "
                  "unsteered clip, for clips steered up (+eta0) and down (-eta0):", "",
                  "| group | n | BPM | shift up (BPM) | shift down (BPM) | probe BPM | probe shift up "
                  "| probe shift down |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_md(r.get(k)) for k in ("group", "n_clips", "bpm", "bpm_shift_up", "bpm_shift_down",
                                                             "probe_bpm", "probe_bpm_shift_up", "probe_bpm_shift_down"))
                  + " |" for r in tempo_rows]
    if settings.preset == "methods":
        lines += ["", "Side by side at matched strength m (the push along the direction per step, summed over the "
                  "steered layers, as a fraction of each layer's norm; evaluation.presets.method_configurations):", ""]
        lines += methods_table(rows)
    lines += ["", "Configurations:", ""]
    lines += [f"- `{c.name}`: {c.describe()}" for c in configs]
    lines += ["", "Files: " + ", ".join(f"`{p.name}`" for p in files.values() if p != path) + ", `units.jsonl` "
              "(one record per finished clip), `sweep.json` (the settings)."]
    path.write_text("\n".join(lines) + "\n")
