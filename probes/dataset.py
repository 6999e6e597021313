"""Reading SynTheory data: `info.csv` -> clip paths and labels, WAV files -> float32 mono at 32 kHz.

Works on what `musicrfm.probes.syntheory.render_dataset` writes and on the original SynTheory layout
(`data/<concept>/info.csv` next to the `.wav`/`.mid` files, as brown-palm/syntheory's generators
write it): both have the same columns, and the clip of a row is `offset_file_path` where the
concept has crops (tempos, time signatures) and `synth_file_path` otherwise, as in the original's
embedding extraction.

The WAV reader (protocol.wav's `decode_wav`) and the resampler are plain numpy, because the original
files are 44.1 kHz stereo 32-bit float WAVs (which the stdlib `wave` module cannot read) and because
the project must not grow a dependency for one polyphase filter.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

from musicrfm.protocol.wav import decode_wav

__all__ = [
    "LABEL_COLUMNS",
    "ConceptData",
    "InfoCsvError",
    "downmix",
    "load_audio",
    "load_concept",
    "resample",
]

# The column that holds each concept's class, as in the original probes (probe/probe_config.py lists
# it first per concept), except notes: the original probed `root_note_pitch_class` (0-11); the same
# classes in the same order are named here by `root_note_name` ("C", "C#", ...), the names the
# steering CLI uses.
LABEL_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        "notes": "root_note_name",
        "intervals": "interval",
        "scales": "mode",
        "chords": "chord_type",
        "chord_progressions": "chord_progression",
        "tempos": "bpm",
        "time_signatures": "time_signature",
    }
)


class InfoCsvError(ValueError):
    """An info.csv that exists but cannot be used (empty, missing columns, bad values)."""


@dataclass(frozen=True, eq=False)
class ConceptData:
    """One concept's clips as listed by its info.csv, in file order.

    `labels[i]` is the class of `paths[i]` (the label column's text, see `LABEL_COLUMNS`);
    `classes` lists the distinct labels in a stable order (musical for notes, numeric for intervals
    and tempos, by (beats, unit) for time signatures, alphabetical otherwise: the order the
    original probes encoded classes in); `label_ids[i]` indexes `classes`. `targets` holds the BPM
    of each clip for tempos (the regression target) and is None for the other concepts. `rows`
    keeps every info.csv column as text, for grouping by instrument, register and so on.
    """

    concept: str
    info_csv: Path
    label_column: str
    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    classes: tuple[str, ...]
    label_ids: np.ndarray
    targets: np.ndarray | None
    silent: tuple[bool, ...]
    rows: tuple[Mapping[str, str], ...]

    def __len__(self) -> int:
        return len(self.paths)


def _time_signature_key(label: str) -> tuple[int, int]:
    # the original wrote Python tuples, e.g. "(6, 8)"
    parts = label.strip().strip("()").split(",")
    if len(parts) != 2:
        raise ValueError(f"not a time signature like '(3, 4)': {label!r}")
    return int(parts[0]), int(parts[1])


def _class_order(concept: str, labels: list[str], rows: list[dict[str, str]], where: str) -> tuple[str, ...]:
    distinct = set(labels)
    try:
        if concept == "notes":
            # order by pitch class (C, C#, ..., B), as the original's integer labels were
            pitch = {}
            for label, row in zip(labels, rows):
                pitch.setdefault(label, int(row["root_note_pitch_class"]))
            return tuple(sorted(distinct, key=lambda name: pitch[name]))
        if concept in ("intervals", "tempos"):
            return tuple(sorted(distinct, key=lambda text: float(text)))
        if concept == "time_signatures":
            return tuple(sorted(distinct, key=_time_signature_key))
    except (KeyError, ValueError) as error:
        raise InfoCsvError(f"{where}: cannot order the {concept} classes: {error}") from None
    return tuple(sorted(distinct))


def load_concept(root: str | os.PathLike, concept: str, *, check_files: bool = True) -> ConceptData:
    """Read `root/<concept>/info.csv` (our renders or an original SynTheory dataset folder).

    `root` is the folder that holds one sub-folder per concept. With `check_files` every listed
    clip must exist. Raises FileNotFoundError for a missing info.csv or clip and InfoCsvError
    (a ValueError) for an info.csv that is empty, lacks the needed columns or holds bad values;
    the message names the file and the row.
    """
    if concept not in LABEL_COLUMNS:
        raise ValueError(f"unknown concept {concept!r}; expected one of {', '.join(LABEL_COLUMNS)}")
    concept_dir = Path(root) / concept
    info_csv = concept_dir / "info.csv"
    if not info_csv.is_file():
        raise FileNotFoundError(
            f"{info_csv}: no info.csv for concept {concept!r} (render it with "
            f"probes.syntheory.render_dataset, or point root at a SynTheory data folder)"
        )
    label_column = LABEL_COLUMNS[concept]
    try:
        with open(info_csv, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InfoCsvError(f"{info_csv}: not a readable CSV file: {error}") from None
    if not header:
        raise InfoCsvError(f"{info_csv}: empty file (no header row)")
    missing = [column for column in (label_column, "synth_file_path") if column not in header]
    if missing:
        raise InfoCsvError(
            f"{info_csv}: missing column(s) {', '.join(missing)}; found {', '.join(header)}"
        )
    if not rows:
        raise InfoCsvError(f"{info_csv}: header only, no clips listed")

    paths: list[Path] = []
    labels: list[str] = []
    silent: list[bool] = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row or any(value is None for value in row.values()):
            raise InfoCsvError(f"{info_csv}:{line}: wrong number of fields (expected {len(header)})")
        label = row[label_column].strip()
        if not label:
            raise InfoCsvError(f"{info_csv}:{line}: empty {label_column}")
        clip = (row.get("offset_file_path") or "").strip() or row["synth_file_path"].strip()
        if not clip:
            raise InfoCsvError(f"{info_csv}:{line}: no clip path (synth_file_path is empty)")
        paths.append(concept_dir / clip)
        labels.append(label)
        silent.append(row.get("is_silent", "False").strip() == "True")

    classes = _class_order(concept, labels, rows, str(info_csv))
    index = {name: i for i, name in enumerate(classes)}
    label_ids = np.array([index[label] for label in labels], dtype=np.int64)

    targets = None
    if concept == "tempos":
        try:
            targets = np.array([float(label) for label in labels], dtype=np.float32)
        except ValueError as error:
            raise InfoCsvError(f"{info_csv}: a bpm value is not a number: {error}") from None

    if check_files:
        absent = [str(path) for path in paths if not path.is_file()]
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise FileNotFoundError(f"{info_csv}: {len(absent)} listed clip(s) missing: {shown}")

    return ConceptData(
        concept=concept,
        info_csv=info_csv,
        label_column=label_column,
        paths=tuple(paths),
        labels=tuple(labels),
        classes=classes,
        label_ids=label_ids,
        targets=targets,
        silent=tuple(silent),
        rows=tuple(MappingProxyType(dict(row)) for row in rows),
    )


# --------------------------------------------------------------------------------------------
# Audio


@functools.lru_cache(maxsize=8)
def _lowpass_filter(up: int, down: int, zero_crossings: int, rolloff: float, beta: float) -> np.ndarray:
    # Kaiser-windowed sinc at the upsampled rate; cutoff just below the lower of the two Nyquist
    # frequencies. Scaled by `up` because zero-stuffing divides the signal's gain by `up`.
    factor = max(up, down)
    half = zero_crossings * factor
    cutoff = rolloff / factor  # as a fraction of the upsampled Nyquist
    m = np.arange(-half, half + 1, dtype=np.float64)
    h = (up * cutoff * np.sinc(cutoff * m) * np.kaiser(2 * half + 1, beta)).astype(np.float32)
    h.flags.writeable = False  # shared through the cache
    return h


def resample(
    x: np.ndarray,
    orig_sr: int,
    target_sr: int,
    *,
    zero_crossings: int = 32,
    rolloff: float = 0.94,
    beta: float = 9.0,
) -> np.ndarray:
    """Band-limited polyphase resampling of a 1-D signal (float32 out, same start time).

    Output length is ceil(len(x) * target_sr / orig_sr). Sample n of the output is the input at
    time n / target_sr: the filter is centred, so there is no delay.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample expects a 1-D signal, got shape {x.shape}")
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    if up == down:
        return x.copy()
    n_out = -(-len(x) * up // down)
    if n_out == 0:
        return np.zeros(0, dtype=np.float32)

    h = _lowpass_filter(up, down, zero_crossings, rolloff, beta)
    half = (len(h) - 1) // 2
    taps = -(-len(h) // up)  # input samples that reach one output sample
    h = np.concatenate([h, np.zeros(taps * up - len(h), dtype=np.float32)])
    # Output n reads the zero-stuffed input at k = n*down + half (the filter's centre), i.e. input
    # samples b - j for j < taps with b = k // up, weighted by h[k % up + j*up]. Outputs with the
    # same n % up share the phase k % up, so each residue class is one strided dot product.
    pad_left = taps - 1
    last = ((n_out - 1) * down + half) // up
    pad_right = max(0, last + 1 - len(x))
    padded = np.concatenate([np.zeros(pad_left, np.float32), x, np.zeros(pad_right, np.float32)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps)
    out = np.empty(n_out, dtype=np.float32)
    for r in range(min(up, n_out)):
        k0 = r * down + half
        phase, base = k0 % up, k0 // up
        weights = h[phase::up][:taps][::-1]
        count = -(-(n_out - r) // up)
        # window s covers input samples s - pad_left .. s, so the window ending at b starts at b
        out[r::up] = windows[base : base + (count - 1) * down + 1 : down] @ weights
    return out


def downmix(audio: np.ndarray) -> np.ndarray:
    """[frames, channels] -> float32 mono, the mean of the channels."""
    channels = audio.shape[1]
    if channels == 1:
        return audio[:, 0].astype(np.float32)
    # a matrix-vector product: numpy's strided mean over axis 1 is several times slower
    return audio.astype(np.float32, copy=False) @ np.full(channels, 1.0 / channels, np.float32)


def load_audio(
    path: str | os.PathLike, sample_rate: int = 32000, *, peak_normalize: bool = False
) -> np.ndarray:
    """A WAV file as float32 mono at `sample_rate` (channels averaged, resampled if needed).

    `peak_normalize` scales the clip to a peak of 1, as the original SynTheory probing did when it
    loaded clips (our renders are already peak-normalised; original downloads are not).
    """
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise ValueError(f"{path}: only WAV files are supported")
    audio, rate = decode_wav(path.read_bytes(), where=str(path))
    mono = downmix(audio)
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate)
    if peak_normalize:
        peak = float(np.abs(mono).max(initial=0.0))
        if peak > 0:
            mono = mono / peak
    return mono.astype(np.float32, copy=False)
