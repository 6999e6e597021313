"""The musicgen-mini training corpus: SynTheory notes, chords and intervals over every instrument, at
the codec's sample rate, with captions that name the instrument family and register but never a
pitch or a chord quality (so the unsteered pitch class is left to chance, and steering has room to
move it).

On disk (a folder, written shard by shard so an interrupted render resumes):
  corpus.json          settings, the plan's hash, and one record per clip (stem, concept, caption, labels)
  audio-00000.npy ...  int16 [clips, samples] at `sample_rate`, `SHARD` clips per file, in plan order
"""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from musicrfm.probes.dataset import resample
from musicrfm.probes.syntheory import (
    CLIP_SECONDS,
    DEFAULT_SOUNDFONT,
    PROGRAMS,
    SAMPLE_RATE,
    ClipSpec,
    Preset,
    plan_clips,
    render_clip,
)

__all__ = ["CorpusSettings", "Clip", "Corpus", "plan_corpus", "caption_for", "render_corpus", "load_corpus"]

SHARD = 512

# Caption words per GM family: what a player would call the sound, never a pitch.
FAMILY_WORDS = {
    "Piano Timbres": "piano",
    "Chromatic Percussion": "mallet",
    "Organ Timbres": "organ",
    "Guitar Timbres": "guitar",
    "Bass Timbres": "bass",
    "String Timbres": "strings",
    "Ensemble Timbres": "ensemble",
    "Brass Timbres": "brass",
    "Reed Timbres": "reed",
    "Pipe Timbres": "flute",
    "Synth Lead": "synth lead",
    "Synth Pad": "synth pad",
    "Ethnic Timbres": "folk",
}
KIND_WORDS = {"notes": "note", "chords": "chord", "intervals": "two notes"}


def register_word(lowest_midi: int) -> str:
    return "low" if lowest_midi < 48 else "middle" if lowest_midi < 72 else "high"


def caption_for(clip: ClipSpec) -> str:
    """'guitar note, low register': family, kind and the register of the lowest note."""
    family = FAMILY_WORDS[PROGRAMS[clip.score.program].category]
    lowest = min(note.pitch for note in clip.score.notes)
    return f"{family} {KIND_WORDS[clip.concept]}, {register_word(lowest)} register"


@dataclass(frozen=True)
class CorpusSettings:
    seed: int = 0
    sample_rate: int = 16_000
    note_octaves: tuple[int, ...] = (2, 3, 4, 5, 6)
    programs: tuple[int, ...] = tuple(PROGRAMS)  # GM programs (all 92 SynTheory instruments)
    chords: int = 2500  # random sample of the 13,248 chord clips over all programs
    intervals: int = 1500  # random sample of the 39,744 interval clips
    validation: float = 0.05  # share of clips held out (by a hash of the stem, stable across runs)
    soundfont: str = DEFAULT_SOUNDFONT


@dataclass(frozen=True)
class Clip:
    stem: str
    concept: str
    caption: str
    label: str  # the concept's class: pitch name, chord quality or interval size
    pitch_class: int  # root pitch class (0 = C)
    program: int
    validation: bool


@dataclass
class Corpus:
    folder: Path
    settings: CorpusSettings
    clips: list[Clip]
    audio: np.ndarray = field(repr=False)  # int16 [clips, samples]

    def indices(self, *, validation: bool, concept: str | None = None) -> np.ndarray:
        return np.array([i for i, c in enumerate(self.clips)
                         if c.validation == validation and (concept is None or c.concept == concept)], dtype=np.int64)

    def waveform(self, i: int) -> np.ndarray:
        return self.audio[i].astype(np.float32) / 32768.0


def _is_validation(stem: str, share: float) -> bool:
    digest = hashlib.sha256(stem.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def plan_corpus(settings: CorpusSettings) -> list[tuple[ClipSpec, Clip]]:
    everything = Preset("mini", programs=tuple(settings.programs), note_octaves=settings.note_octaves)
    rng = random.Random(settings.seed)
    chords = plan_clips("chords", everything)
    intervals = plan_clips("intervals", everything)
    picked = (plan_clips("notes", everything) + rng.sample(chords, min(settings.chords, len(chords)))
              + rng.sample(intervals, min(settings.intervals, len(intervals))))
    out = []
    for spec in picked:
        columns = dict(spec.columns)
        clip = Clip(stem=f"{spec.concept}/{spec.stem}", concept=spec.concept, caption=caption_for(spec),
                    label=spec.label, pitch_class=int(columns["root_note_pitch_class"]), program=spec.score.program,
                    validation=_is_validation(spec.stem, settings.validation))
        out.append((spec, clip))
    return out


def _render_one(args: tuple[ClipSpec, str, int]) -> np.ndarray:
    spec, soundfont, sample_rate = args
    audio = resample(render_clip(spec, soundfont), SAMPLE_RATE, sample_rate)
    peak = float(np.abs(audio).max(initial=0.0))
    return np.round(audio * (32767.0 / peak) if peak > 0 else audio).astype(np.int16)


def _plan_hash(settings: CorpusSettings, clips: list[Clip]) -> str:
    text = json.dumps([asdict(settings), [asdict(c) for c in clips]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_corpus(folder: str | Path, settings: CorpusSettings = CorpusSettings(), *, workers: int = 2,
                  progress: bool = True) -> Corpus:
    """Render (or finish rendering) the corpus into `folder`; returns it loaded."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    planned = plan_corpus(settings)
    clips = [c for _, c in planned]
    meta = {"format": "musicrfm.mini-corpus", "version": 1, "settings": asdict(settings),
            "plan_hash": _plan_hash(settings, clips), "clip_seconds": CLIP_SECONDS, "shard": SHARD,
            "clips": [asdict(c) for c in clips]}
    index = folder / "corpus.json"
    if index.exists() and json.loads(index.read_text())["plan_hash"] != meta["plan_hash"]:
        raise ValueError(f"{folder} holds a corpus rendered with other settings; use another folder")
    index.write_text(json.dumps(meta, indent=1))
    shards = range(0, len(planned), SHARD)
    with ProcessPoolExecutor(workers) as pool, tqdm(total=len(planned), disable=not progress, desc="render") as bar:
        for start in shards:
            path = folder / f"audio-{start // SHARD:05d}.npy"
            part = planned[start : start + SHARD]
            if not path.exists():
                jobs = [(spec, settings.soundfont, settings.sample_rate) for spec, _ in part]
                audio = np.stack(list(pool.map(_render_one, jobs, chunksize=8)))
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, audio)
                tmp.replace(path)
            bar.update(len(part))
    return load_corpus(folder)


def load_corpus(folder: str | Path) -> Corpus:
    folder = Path(folder)
    index = folder / "corpus.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no corpus.json: render it with `musicrfm mini corpus --work {folder.parent}`")
    meta = json.loads(index.read_text())
    if meta.get("format") != "musicrfm.mini-corpus":
        raise ValueError(f"{index} is not a musicgen-mini corpus index")
    settings_dict = meta["settings"]
    settings_dict["note_octaves"] = tuple(settings_dict["note_octaves"])
    settings_dict["programs"] = tuple(settings_dict.get("programs", PROGRAMS))
    settings = CorpusSettings(**settings_dict)
    clips = [Clip(**c) for c in meta["clips"]]
    shards = sorted(folder.glob("audio-[0-9][0-9][0-9][0-9][0-9].npy"))
    expected = -(-len(clips) // meta["shard"])
    if len(shards) != expected:
        raise ValueError(f"{folder}: {len(shards)} of {expected} audio shards; finish it with `musicrfm mini corpus`")
    audio = np.concatenate([np.load(p) for p in shards])
    return Corpus(folder, settings, clips, audio)
