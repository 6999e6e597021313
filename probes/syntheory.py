"""SynTheory, regenerated offline: the seven music-theory concepts of Wei et al. (ISMIR 2024),
written as MIDI and rendered with the TimGM6mb General MIDI soundfont.

The definitions follow the original generators (github.com/brown-palm/syntheory,
dataset/synthetic/*.py) so that probes trained here see the same data:

  notes               12 pitch classes x octaves 0-8 (MIDI 0-107), 4 plays of 2 beats
  intervals           12 sizes (m2..P8) x 12 roots (MIDI 60-71) x UP/DOWN/UNISON
  scales              7 modes x 12 tonics x UP/DOWN, 8 notes of 1 beat (tonic to octave)
  chords              major/minor/aug/dim x 12 roots x root position, 6, 64; 4 plays of 2 beats
  chord_progressions  19 progressions (10 major, 9 minor) x 12 keys, 4 chords of 2 beats
  tempos              50-210 BPM x 5 click setups, 4 s crops of a ~20 s click track
  time_signatures     8 signatures x 3 reverb levels x 5 click setups, 4 s crops of a ~30 s track

Tonal clips: one track, GM program on channel 2 (the drum channel is 9), velocity 64, 480 ticks
per beat, 120 BPM, 8 beats = 4 s; the render stops at the last note-off, as the original's
rustysynth renderer did. Pitched concepts use the 92 "tonal" GM programs of the original
(no sound effects, no programs with ambiguous pitch).

Differences from the original, all deliberate:
  - crops (tempos, time signatures) are drawn from a hash of (seed, concept, clip name) instead of
    an unseeded random.uniform, so a render is reproducible and resumable;
  - the WAVs are what the original probing fed MusicGen: 32 kHz mono 16-bit PCM, peak-normalised,
    4 s (the original stored 44.1 kHz stereo float WAVs and normalised at load time); the
    full-length click-track renders behind the crops are not kept (their `.mid` is);
  - file names drop the quote characters of 'Choir "Aah"' / 'Choir "Ooh"' (the info.csv keeps the
    program names verbatim).
See docs/syntheory.md.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import secrets
from bisect import bisect
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from musicrfm.probes.dataset import downmix, resample
from musicrfm.protocol.wav import decode_wav, encode_wav

__all__ = [
    "CLICK_SETUPS",
    "CONCEPTS",
    "DEFAULT_SOUNDFONT",
    "INFO_COLUMNS",
    "PRESETS",
    "PROGRAMS",
    "ClickSetup",
    "ClipSpec",
    "Note",
    "Preset",
    "MidiScore",
    "SoundfontNotFoundError",
    "plan_clips",
    "render_clip",
    "render_dataset",
    "render_score",
    "score_to_midi",
]

# The original's dataset folder names.
CONCEPTS: tuple[str, ...] = (
    "notes",
    "intervals",
    "scales",
    "chords",
    "chord_progressions",
    "tempos",
    "time_signatures",
)

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/TimGM6mb.sf2"
SOUNDFONT_PACKAGE = "timgm6mb-soundfont"

SAMPLE_RATE = 32_000  # MusicGen's EnCodec rate
CLIP_SECONDS = 4.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)
TICKS_PER_BEAT = 480
TONAL_BPM = 120  # 2 beats per second: 8 beats fill the 4 s clip
TONAL_CHANNEL = 2
TONAL_VELOCITY = 64
# Bump when a change to this module changes the audio or MIDI it writes: cached clips of an older
# version are then rendered again instead of being silently mixed with new ones.
RENDER_VERSION = 1
_STAMP_NAME = ".syntheory-render.json"

PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

# Scale steps in semitones from the tonic (the original's dataset/music/constants.py).
MODES: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "ionian": (0, 2, 4, 5, 7, 9, 11),
        "dorian": (0, 2, 3, 5, 7, 9, 10),
        "phrygian": (0, 1, 3, 5, 7, 8, 10),
        "lydian": (0, 2, 4, 6, 7, 9, 11),
        "mixolydian": (0, 2, 4, 5, 7, 9, 10),
        "aeolian": (0, 2, 3, 5, 7, 8, 10),
        "locrian": (0, 1, 3, 5, 6, 8, 10),
        "harmonicMinor": (0, 2, 3, 5, 7, 8, 11),
    }
)
SCALE_MODES = ("ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian")

# Triads as (mode, scale degree, tonic offset from the chord root): the original stacks thirds
# inside that mode, so an augmented triad is the III of the harmonic minor a minor third below.
CHORD_TYPES: Mapping[str, tuple[str, int, int]] = MappingProxyType(
    {
        "major": ("ionian", 1, 0),
        "minor": ("aeolian", 1, 0),
        "aug": ("harmonicMinor", 3, -3),
        "dim": ("locrian", 1, 0),
    }
)
# Inversion labels as the original's info.csv writes them: "5" is root position.
INVERSIONS = ("5", "6", "64")

# (mode, scale degrees of the four chords), in the original's order.
PROGRESSIONS: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("ionian", (1, 4, 5, 1)),
    ("ionian", (1, 4, 6, 5)),
    ("ionian", (1, 5, 6, 4)),
    ("ionian", (1, 6, 4, 5)),
    ("ionian", (2, 5, 1, 6)),
    ("ionian", (4, 1, 5, 6)),
    ("ionian", (4, 5, 3, 6)),
    ("ionian", (5, 4, 1, 5)),
    ("ionian", (5, 6, 4, 1)),
    ("ionian", (6, 4, 1, 5)),
    ("aeolian", (1, 2, 5, 1)),
    ("aeolian", (1, 3, 4, 1)),
    ("aeolian", (1, 4, 5, 1)),
    ("aeolian", (1, 6, 3, 7)),
    ("aeolian", (1, 6, 7, 1)),
    ("aeolian", (1, 6, 7, 3)),
    ("aeolian", (1, 7, 6, 4)),
    ("aeolian", (4, 7, 1, 1)),
    ("aeolian", (7, 6, 7, 1)),
)

INTERVAL_STYLES = ("UP", "DOWN", "UNISON")  # play_style 0, 1, 2
SCALE_STYLES = ("UP", "DOWN")
TIME_SIGNATURES: tuple[tuple[int, int], ...] = (
    (2, 2), (2, 4), (3, 4), (3, 8), (4, 4), (6, 8), (9, 8), (12, 8),
)  # fmt: skip
REVERB_LEVELS: Mapping[int, int] = MappingProxyType({0: 0, 1: 63, 2: 127})  # level -> CC 91 value


@dataclass(frozen=True)
class Program:
    number: int
    name: str  # as the original's instruments.csv spells it (info.csv keeps it verbatim)
    category: str


def _programs() -> tuple[Program, ...]:
    # The 92 GM programs the original used for every tonal concept: all but sound effects (96-103,
    # 112-127), bell-like or chord-like timbres (8, 9, 14, 21, 23, 47, 86) and expressive voices
    # (22, 31, 55, 77, 78).
    table = {
        "Piano Timbres": "0 Acoustic Grand Piano|1 Bright Acoustic Piano|2 Electric Grand Piano|"
        "3 Honky-tonk Piano|4 Rhodes Piano|5 Chorused Piano|6 Harpsichord|7 Clavinet",
        "Chromatic Percussion": "10 Music Box|11 Vibraphone|12 Marimba|13 Xylophone|15 Dulcimer",
        "Organ Timbres": "16 Hammond Organ|17 Percussive Organ|18 Rock Organ|19 Church Organ|"
        "20 Reed Organ",
        "Guitar Timbres": "24 Acoustic Nylon Guitar|25 Acoustic Steel Guitar|26 Electric Jazz Guitar|"
        "27 Electric Clean Guitar|28 Electric Muted Guitar|29 Overdriven Guitar|30 Distortion Guitar",
        "Bass Timbres": "32 Acoustic Bass|33 Fingered Electric Bass|34 Plucked Electric Bass|"
        "35 Fretless Bass|36 Slap Bass 1|37 Slap Bass 2|38 Synth Bass 1|39 Synth Bass 2",
        "String Timbres": "40 Violin|41 Viola|42 Cello|43 Contrabass|44 Tremolo Strings|"
        "45 Pizzicato Strings|46 Orchestral Harp",
        "Ensemble Timbres": "48 String Ensemble 1|49 String Ensemble 2|50 Synth Strings 1|"
        '51 Synth Strings 2|52 Choir "Aah"|53 Choir "Ooh"|54 Synth Voice',
        "Brass Timbres": "56 Trumpet|57 Trombone|58 Tuba|59 Muted Trumpet|60 French Horn|"
        "61 Brass Section|62 Synth Brass 1|63 Synth Brass 2",
        "Reed Timbres": "64 Soprano Sax|65 Alto Sax|66 Tenor Sax|67 Baritone Sax|68 Oboe|"
        "69 English Horn|70 Bassoon|71 Clarinet",
        "Pipe Timbres": "72 Piccolo|73 Flute|74 Recorder|75 Pan Flute|76 Bottle Blow|79 Ocarina",
        "Synth Lead": "80 Square Wave Lead|81 Sawtooth Wave Lead|82 Calliope Lead|83 Chiff Lead|"
        "84 Charang Lead|85 Voice Lead|87 Bass Lead",
        "Synth Pad": "88 New Age Pad|89 Warm Pad|90 Polysynth Pad|91 Choir Pad|92 Bowed Pad|"
        "93 Metallic Pad|94 Halo Pad|95 Sweep Pad",
        "Ethnic Timbres": "104 Sitar|105 Banjo|106 Shamisen|107 Koto|108 Kalimba|109 Bagpipe|"
        "110 Fiddle|111 Shanai",
    }
    programs = []
    for category, entries in table.items():
        for entry in entries.split("|"):
            number, name = entry.split(" ", 1)
            programs.append(Program(int(number), name, category))
    return tuple(sorted(programs, key=lambda p: p.number))


PROGRAMS: Mapping[int, Program] = MappingProxyType({p.number: p for p in _programs()})


@dataclass(frozen=True)
class ClickSetup:
    """A metronome sound: a GM program on a channel, an accented note on the downbeat."""

    name: str
    channel: int
    program: int
    downbeat_note: int
    offbeat_note: int
    downbeat_velocity: int = 100
    offbeat_velocity: int = 75


# The original's five click configurations (dataset/synthetic/metronome_configs.py). "default" is
# the GM drum kit (channel 9): side stick on the downbeat, sticks otherwise.
CLICK_SETUPS: tuple[ClickSetup, ...] = (
    ClickSetup("default", channel=9, program=0, downbeat_note=37, offbeat_note=31),
    ClickSetup("woodblock_dark", channel=2, program=115, downbeat_note=37, offbeat_note=31),
    ClickSetup("woodblock_light", channel=2, program=115, downbeat_note=52, offbeat_note=48),
    ClickSetup("taiko", channel=2, program=116, downbeat_note=52, offbeat_note=48),
    ClickSetup("synth_drum", channel=2, program=118, downbeat_note=52, offbeat_note=48),
)
_CLICKS_BY_NAME = MappingProxyType({setup.name: setup for setup in CLICK_SETUPS})


@dataclass(frozen=True)
class Preset:
    """How many variations of each class to render. Every preset renders every class.

    programs         GM programs for the five tonal concepts (a subset of PROGRAMS)
    note_octaves     octaves (MIDI note // 12) for `notes`
    tempo_bpms       the tempo classes
    click_setups     names from CLICK_SETUPS, for tempos and time signatures
    tempo_crops      4 s crops per tempo click track
    reverb_levels    0, 1, 2 (CC 91 = 0, 63, 127) for time signatures
    signature_crops  4 s crops per time-signature click track
    """

    name: str
    programs: tuple[int, ...]
    note_octaves: tuple[int, ...] = tuple(range(9))
    tempo_bpms: tuple[int, ...] = tuple(range(50, 211))
    click_setups: tuple[str, ...] = tuple(setup.name for setup in CLICK_SETUPS)
    tempo_crops: int = 5
    reverb_levels: tuple[int, ...] = (0, 1, 2)
    signature_crops: int = 10

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"preset {self.name!r}: {what}")

        unknown = sorted(set(self.programs) - set(PROGRAMS))
        check(bool(self.programs), "no programs")
        check(not unknown, f"programs {unknown} are not among the 92 SynTheory programs")
        check(bool(self.note_octaves) and all(0 <= o <= 8 for o in self.note_octaves),
              "note_octaves must be within 0-8 (the soundfont has nothing above C9)")
        check(bool(self.tempo_bpms) and all(20 <= b <= 400 for b in self.tempo_bpms),
              "tempo_bpms must be within 20-400")
        check(bool(self.click_setups) and set(self.click_setups) <= set(_CLICKS_BY_NAME),
              f"click_setups must be among {', '.join(_CLICKS_BY_NAME)}")
        check(bool(self.reverb_levels) and set(self.reverb_levels) <= set(REVERB_LEVELS),
              "reverb_levels must be among 0, 1, 2")
        check(self.tempo_crops >= 1 and self.signature_crops >= 1, "crops must be >= 1")
        for field in ("programs", "note_octaves", "tempo_bpms", "click_setups", "reverb_levels"):
            values = getattr(self, field)
            check(len(set(values)) == len(values), f"{field} has duplicates")


# Six instruments from six GM families (piano, guitar, strings, brass, pipe, synth lead) and the
# middle five octaves (C1-B5, where every one of them speaks clearly); one crop per click track
# for tempos, two for time signatures. Every class of every concept is kept.
QUICK_PROGRAMS = (0, 24, 40, 56, 73, 81)
PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "quick": Preset(
            "quick",
            programs=QUICK_PROGRAMS,
            note_octaves=(2, 3, 4, 5, 6),
            tempo_crops=1,
            signature_crops=2,
        ),
        "full": Preset("full", programs=tuple(PROGRAMS)),
    }
)


@dataclass(frozen=True)
class Note:
    start: int  # ticks
    end: int  # ticks
    pitch: int  # MIDI note number
    velocity: int


@dataclass(frozen=True)
class MidiScore:
    """Everything one single-track MIDI file holds."""

    track_name: str
    program: int
    channel: int
    bpm: int
    time_signature: tuple[int, int]
    notes: tuple[Note, ...]
    reverb: int | None = None  # CC 91 value sent before the notes (click tracks only)

    @property
    def seconds(self) -> float:
        end = max(note.end for note in self.notes)
        return end / TICKS_PER_BEAT * 60.0 / self.bpm


InfoValue = str | int | bool


@dataclass(frozen=True)
class ClipSpec:
    """One 4 s clip: where it goes, its info.csv row, and the MIDI it is cut from.

    Crops of one click track share `midi_stem` and `score`; `crop_start` is the first sample (at
    32 kHz) of the clip in the track's render, 0 for the tonal concepts.
    """

    concept: str
    stem: str  # <stem>.wav
    midi_stem: str  # <midi_stem>.mid
    label: str
    columns: tuple[tuple[str, InfoValue], ...]  # info.csv columns except row_id, synth_soundfont, is_silent
    score: MidiScore
    source_seconds: float  # the render is cut (or padded) to this length before cropping
    crop_start: int = 0

    @property
    def wav_name(self) -> str:
        return f"{self.stem}.wav"

    @property
    def midi_name(self) -> str:
        return f"{self.midi_stem}.mid"


# info.csv columns per concept, in the original's order (row_id first, as its writer put it).
_TONAL_TAIL = ("midi_program_num", "midi_program_name", "midi_category", "midi_file_path",
               "synth_file_path", "synth_soundfont", "is_silent")  # fmt: skip
INFO_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "notes": ("row_id", "root_note_name", "root_note_pitch_class", "octave",
                  "root_note_is_accidental", "register", "midi_note_val", *_TONAL_TAIL),
        "intervals": ("row_id", "root_note_name", "root_note_pitch_class", "interval", "play_style",
                      "play_style_name", "midi_note_val", *_TONAL_TAIL),
        "scales": ("row_id", "root_note_name", "mode", "play_style", "play_style_name", *_TONAL_TAIL),
        "chords": ("row_id", "root_note_name", "chord_type", "inversion", "root_note_is_accidental",
                   "root_note_pitch_class", *_TONAL_TAIL),
        "chord_progressions": ("row_id", "key_note_name", "key_note_pitch_class",
                               "chord_progression", *_TONAL_TAIL),
        "tempos": ("row_id", "bpm", "click_config_name", "midi_program_num", "midi_file_path",
                   "synth_file_path", "offset_file_path", "offset_time", "synth_soundfont",
                   "is_silent"),
        "time_signatures": ("row_id", "time_signature", "time_signature_beats",
                            "time_signature_subdivision", "is_compound", "bpm", "click_config_name",
                            "midi_program_num", "midi_file_path", "synth_file_path",
                            "offset_file_path", "offset_time", "synth_soundfont", "reverb_level",
                            "is_silent"),
    }
)  # fmt: skip


class SoundfontNotFoundError(FileNotFoundError):
    """The General MIDI soundfont needed to render is not there."""


# --------------------------------------------------------------------------------------------
# Music: the original's voicings


def _tonic_midi(pitch_class: int) -> int:
    # Keys are centred on middle C: C..F sit at or above MIDI 60, F#..B below it.
    return 60 + pitch_class if pitch_class <= 5 else 48 + pitch_class


def _triad(tonic_pc: int, mode: str, degree: int) -> list[int]:
    """MIDI notes of the triad on `degree` of `mode` built on `tonic_pc`, voiced as the original.

    Each chord tone is the tonic's MIDI note plus the mode's offset for that degree, with no
    octave wrap: a IV chord in C is F4 A4 C4, not F4 A4 C5. That is the original's voicing, kept
    because it is what the probes were trained on.
    """
    steps = MODES[mode]
    tonic = _tonic_midi(tonic_pc)
    return [tonic + steps[(degree - 1 + 2 * k) % 7] for k in range(3)]


def _invert(notes: list[int], inversion: str) -> list[int]:
    # first inversion ("6"): root up an octave; second ("64"): root and third up an octave
    if inversion == "6":
        return notes[1:] + [notes[0] + 12]
    if inversion == "64":
        return notes[2:] + [n + 12 for n in notes[:2]]
    return list(notes)


def _chord_notes(root_pc: int, chord_type: str, inversion: str) -> list[int]:
    mode, degree, tonic_offset = CHORD_TYPES[chord_type]
    return _invert(_triad((root_pc + tonic_offset) % 12, mode, degree), inversion)


def _timed(groups: Iterable[Sequence[int]], beats: float, velocity: int = TONAL_VELOCITY) -> tuple[Note, ...]:
    """Consecutive note groups (single notes or chords), each held for `beats`."""
    length = round(beats * TICKS_PER_BEAT)
    notes = []
    for i, group in enumerate(groups):
        notes.extend(Note(i * length, (i + 1) * length, pitch, velocity) for pitch in group)
    return tuple(notes)


def _tonal_score(program: Program, notes: tuple[Note, ...]) -> MidiScore:
    return MidiScore(
        track_name=program.name,
        program=program.number,
        channel=TONAL_CHANNEL,
        bpm=TONAL_BPM,
        time_signature=(4, 4),
        notes=notes,
    )


def _click_score(setup: ClickSetup, bpm: int, time_signature: tuple[int, int], clicks: int, reverb: int) -> MidiScore:
    beats_per_bar, unit = time_signature
    # Compound meters (3/8, 6/8, 9/8, 12/8 here) click every eighth note at the quarter-note tempo;
    # simple meters click once per notated beat (a half note in 2/2, a quarter in 3/4). Like the
    # original, the track plays one click more than `clicks`.
    compound = _is_compound(time_signature)
    ticks = TICKS_PER_BEAT // 2 if compound else int(TICKS_PER_BEAT / (unit / 4))
    notes = []
    for i in range(clicks + 1):
        downbeat = i % beats_per_bar == 0
        notes.append(
            Note(
                i * ticks,
                (i + 1) * ticks,
                setup.downbeat_note if downbeat else setup.offbeat_note,
                setup.downbeat_velocity if downbeat else setup.offbeat_velocity,
            )
        )
    return MidiScore(
        track_name="click",
        program=setup.program,
        channel=setup.channel,
        bpm=bpm,
        time_signature=time_signature,
        notes=tuple(notes),
        reverb=REVERB_LEVELS[reverb],
    )


def _is_compound(time_signature: tuple[int, int]) -> bool:
    beats, unit = time_signature
    return beats % 3 == 0 and unit != 4


# --------------------------------------------------------------------------------------------
# Plans


def _file_name(program: Program) -> str:
    return program.name.replace(" ", "_").replace('"', "")


def _tonal_columns(program: Program, stem: str) -> tuple[tuple[str, InfoValue], ...]:
    return (
        ("midi_program_num", program.number),
        ("midi_program_name", program.name),
        ("midi_category", program.category),
        ("midi_file_path", f"{stem}.mid"),
        ("synth_file_path", f"{stem}.wav"),
    )


def _tonal_clip(concept: str, stem: str, label: str, columns: tuple[tuple[str, InfoValue], ...],
                program: Program, notes: tuple[Note, ...]) -> ClipSpec:  # fmt: skip
    return ClipSpec(
        concept=concept,
        stem=stem,
        midi_stem=stem,
        label=label,
        columns=tuple(columns) + _tonal_columns(program, stem),
        score=_tonal_score(program, notes),
        source_seconds=CLIP_SECONDS,
    )


def _plan_notes(preset: Preset) -> Iterator[ClipSpec]:
    programs = [PROGRAMS[p] for p in preset.programs]
    for midi in range(108):  # C0..B8, the original's range
        octave, pc = divmod(midi, 12)
        if octave not in preset.note_octaves:
            continue
        name = PITCH_NAMES[pc]
        register = bisect((3, 6, 9), octave)  # low / mid / high, three octaves each
        for program in programs:
            stem = f"{midi}_{register}_{name}_{program.number}_{_file_name(program)}"
            columns = (
                ("root_note_name", name),
                ("root_note_pitch_class", pc),
                ("octave", octave),
                ("root_note_is_accidental", name.endswith("#")),
                ("register", register),
                ("midi_note_val", midi),
            )
            yield _tonal_clip("notes", stem, name, columns, program, _timed([[midi]] * 4, beats=2))


def _plan_intervals(preset: Preset) -> Iterator[ClipSpec]:
    programs = [PROGRAMS[p] for p in preset.programs]
    for base in range(60, 72):
        name = PITCH_NAMES[base % 12]
        for size in range(1, 13):
            low, high = base, base + size
            for style, style_name in enumerate(INTERVAL_STYLES):
                if style_name == "UP":
                    notes = _timed([[low], [high]] * 4, beats=1)
                elif style_name == "DOWN":
                    notes = _timed([[high], [low]] * 4, beats=1)
                else:  # both notes together, 8 times
                    notes = _timed([[low, high]] * 8, beats=1)
                for program in programs:
                    stem = f"{name}_{size}_{style_name}_{program.number}_{_file_name(program)}"
                    columns = (
                        ("root_note_name", name),
                        ("root_note_pitch_class", base % 12),
                        ("interval", size),
                        ("play_style", style),
                        ("play_style_name", style_name),
                        ("midi_note_val", base),
                    )
                    yield _tonal_clip("intervals", stem, str(size), columns, program, notes)


def _plan_scales(preset: Preset) -> Iterator[ClipSpec]:
    programs = [PROGRAMS[p] for p in preset.programs]
    for pc, name in enumerate(PITCH_NAMES):
        for mode in SCALE_MODES:
            ascending = [_tonic_midi(pc) + step for step in MODES[mode] + (12,)]
            for style, style_name in enumerate(SCALE_STYLES):
                pitches = ascending if style_name == "UP" else ascending[::-1]
                notes = _timed([[p] for p in pitches], beats=1)
                for program in programs:
                    stem = f"{name}_{mode}_{style_name}_{program.number}_{_file_name(program)}"
                    columns = (
                        ("root_note_name", name),
                        ("mode", mode),
                        ("play_style", style),
                        ("play_style_name", style_name),
                    )
                    yield _tonal_clip("scales", stem, mode, columns, program, notes)


def _plan_chords(preset: Preset) -> Iterator[ClipSpec]:
    programs = [PROGRAMS[p] for p in preset.programs]
    for pc, name in enumerate(PITCH_NAMES):
        for chord_type in CHORD_TYPES:
            for inversion in INVERSIONS:
                notes = _timed([_chord_notes(pc, chord_type, inversion)] * 4, beats=2)
                for program in programs:
                    stem = f"{name}_{chord_type}_{inversion}_{program.number}_{_file_name(program)}"
                    columns = (
                        ("root_note_name", name),
                        ("chord_type", chord_type),
                        ("inversion", inversion),
                        ("root_note_is_accidental", name.endswith("#")),
                        ("root_note_pitch_class", pc),
                    )
                    yield _tonal_clip("chords", stem, chord_type, columns, program, notes)


def _progression_label(mode: str, degrees: tuple[int, ...]) -> str:
    return f"{mode}-{degrees}"  # e.g. "ionian-(1, 4, 5, 1)", the original's label text


def _plan_chord_progressions(preset: Preset) -> Iterator[ClipSpec]:
    programs = [PROGRAMS[p] for p in preset.programs]
    for pc, name in enumerate(PITCH_NAMES):
        for mode, degrees in PROGRESSIONS:
            label = _progression_label(mode, degrees)
            notes = _timed([_triad(pc, mode, degree) for degree in degrees], beats=2)
            for program in programs:
                degrees_text = "-".join(map(str, degrees))
                stem = f"{name}_{mode}_{degrees_text}_{program.number}_{_file_name(program)}"
                columns = (
                    ("key_note_name", name),
                    ("key_note_pitch_class", pc),
                    ("chord_progression", label),
                )
                yield _tonal_clip("chord_progressions", stem, label, columns, program, notes)


def _crop_start(seed: int, concept: str, stem: str, source_seconds: float) -> int:
    # A hash, not a shared RNG stream: each crop depends only on (seed, concept, its own name), so
    # plans for a subset, a different preset or a resumed run all agree on every crop.
    latest = int(round((source_seconds - CLIP_SECONDS) * SAMPLE_RATE))
    digest = hashlib.sha256(f"syntheory/{seed}/{concept}/{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (latest + 1)


def _crops(concept: str, seed: int, midi_stem: str, count: int, source_seconds: float, score: MidiScore,
           label: str, head: tuple[tuple[str, InfoValue], ...],
           tail: tuple[tuple[str, InfoValue], ...]) -> Iterator[ClipSpec]:  # fmt: skip
    for i in range(count):
        stem = f"{midi_stem}_offset_{i}"
        start = _crop_start(seed, concept, stem, source_seconds)
        columns = head + (
            ("midi_file_path", f"{midi_stem}.mid"),
            # the full-length render is not kept; its MIDI is (see the module docstring)
            ("synth_file_path", f"{midi_stem}.wav"),
            ("offset_file_path", f"{stem}.wav"),
            ("offset_time", str(start / SAMPLE_RATE)),
        ) + tail
        yield ClipSpec(concept, stem, midi_stem, label, columns, score, source_seconds, start)


def _plan_tempos(preset: Preset, seed: int) -> Iterator[ClipSpec]:
    for bpm in preset.tempo_bpms:
        for setup in (_CLICKS_BY_NAME[name] for name in preset.click_setups):
            # bpm // 3 beats (+1) just exceed 20 s; the render is cut to 20 s like the original's
            score = _click_score(setup, bpm, (4, 4), clicks=bpm // 3, reverb=0)
            head = (("bpm", bpm), ("click_config_name", setup.name), ("midi_program_num", setup.program))
            yield from _crops("tempos", seed, f"{bpm}_bpm_{setup.name}", preset.tempo_crops, 20.0,
                              score, str(bpm), head, tail=())  # fmt: skip


def _plan_time_signatures(preset: Preset, seed: int) -> Iterator[ClipSpec]:
    bpm = TONAL_BPM
    for time_signature in TIME_SIGNATURES:
        beats, unit = time_signature
        label = str(time_signature)  # "(3, 4)", as the original's info.csv has it
        for reverb in preset.reverb_levels:
            for setup in (_CLICKS_BY_NAME[name] for name in preset.click_setups):
                # (unit / 4) * (bpm // 2) clicks (+1) just exceed 30 s; cut to 30 s
                clicks = int((unit / 4) * (bpm // 2))
                score = _click_score(setup, bpm, time_signature, clicks, reverb)
                midi_stem = f"{beats}_{unit}_{bpm}_bpm_{setup.name}_reverb_level_{reverb}"
                head = (
                    ("time_signature", label),
                    ("time_signature_beats", beats),
                    ("time_signature_subdivision", unit),
                    ("is_compound", int(_is_compound(time_signature))),
                    ("bpm", bpm),
                    ("click_config_name", setup.name),
                    ("midi_program_num", setup.program),
                )
                yield from _crops("time_signatures", seed, midi_stem, preset.signature_crops, 30.0,
                                  score, label, head, tail=(("reverb_level", reverb),))  # fmt: skip


def _resolve_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def plan_clips(concept: str, preset: str | Preset, seed: int = 0) -> list[ClipSpec]:
    """Every clip of `concept` under `preset`, in the original's row order. Pure and deterministic;
    `seed` only moves the crops of tempos and time signatures."""
    preset = _resolve_preset(preset)
    planners = {
        "notes": lambda: _plan_notes(preset),
        "intervals": lambda: _plan_intervals(preset),
        "scales": lambda: _plan_scales(preset),
        "chords": lambda: _plan_chords(preset),
        "chord_progressions": lambda: _plan_chord_progressions(preset),
        "tempos": lambda: _plan_tempos(preset, seed),
        "time_signatures": lambda: _plan_time_signatures(preset, seed),
    }
    if concept not in planners:
        raise ValueError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
    return list(planners[concept]())


# --------------------------------------------------------------------------------------------
# MIDI and audio


def _require(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"rendering SynTheory needs the Python package {pip_name!r}: pip install {pip_name}"
        ) from error


def score_to_midi(score: MidiScore) -> bytes:
    """The score as a type-1 MIDI file (480 ticks per beat), message for message as the original
    wrote it: meta events, program change, optional reverb, then the notes."""
    mido = _require("mido", "mido")
    track = mido.MidiTrack()
    numerator, denominator = score.time_signature
    track.append(mido.MetaMessage("track_name", name=score.track_name, time=0))
    track.append(mido.MetaMessage("time_signature", numerator=numerator, denominator=denominator,
                                  clocks_per_click=24, notated_32nd_notes_per_beat=8, time=0))  # fmt: skip
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(score.bpm), time=0))
    track.append(mido.Message("program_change", program=score.program, channel=score.channel, time=0))
    if score.reverb is not None:
        track.append(mido.Message("control_change", control=91, value=score.reverb,
                                  channel=score.channel, time=0))  # fmt: skip
    # At equal ticks, note-offs go first so a repeated pitch is released before it is struck again.
    events = sorted(
        [(note.end, 0, i, "note_off", note) for i, note in enumerate(score.notes)]
        + [(note.start, 1, i, "note_on", note) for i, note in enumerate(score.notes)]
    )
    now = 0
    for tick, _, _, kind, note in events:
        track.append(mido.Message(kind, note=note.pitch, velocity=note.velocity,
                                  channel=score.channel, time=tick - now))  # fmt: skip
        now = tick
    midi = mido.MidiFile(type=1, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    buffer = io.BytesIO()
    midi.save(file=buffer)  # mido appends end_of_track
    return buffer.getvalue()


def _check_soundfont(soundfont: str | os.PathLike) -> Path:
    path = Path(soundfont)
    if not path.is_file():
        raise SoundfontNotFoundError(
            f"SoundFont not found: {path}. SynTheory is rendered with the TimGM6mb General MIDI "
            f"soundfont: install the Debian/Ubuntu package {SOUNDFONT_PACKAGE} "
            f"(apt-get install {SOUNDFONT_PACKAGE}, which puts it at {DEFAULT_SOUNDFONT}), or pass "
            f"another .sf2 file with --soundfont (soundfont= in Python)."
        )
    return path


@functools.lru_cache(maxsize=1)
def _soundfont_bytes(path: str) -> bytes:
    # Read once per process (each pool worker keeps its own copy); midirenderer takes bytes.
    return Path(path).read_bytes()


def render_score(score: MidiScore, soundfont: str | os.PathLike = DEFAULT_SOUNDFONT) -> np.ndarray:
    """Render a score: float32 mono at 32 kHz, as long as the MIDI (to its last note-off)."""
    return _render_midi(score_to_midi(score), _check_soundfont(soundfont))


def render_clip(clip: ClipSpec, soundfont: str | os.PathLike = DEFAULT_SOUNDFONT) -> np.ndarray:
    """One planned clip as `render_dataset` writes it, without files: float32 mono at 32 kHz, 4 s,
    peak-normalised and quantised to 16 bits, exactly what `musicrfm.probes.dataset.load_audio` reads back
    from the WAV (16-bit samples / 32768). A click-track crop renders its whole track first, so
    use this for a sample of clips, not for a dataset."""
    audio = _fit(render_score(clip.score, soundfont), round(clip.source_seconds * SAMPLE_RATE))
    pcm = _to_pcm16(audio[clip.crop_start : clip.crop_start + CLIP_SAMPLES])
    return pcm.astype(np.float32) / np.float32(32768.0)


def _render_midi(midi: bytes, soundfont: Path) -> np.ndarray:
    # midirenderer (rustysynth, the original's synthesiser) returns 48 kHz stereo 16-bit; the
    # channels are averaged and resampled, as the original probing did to its 44.1 kHz renders.
    renderer = _require("midirenderer", "midirenderer")
    wav = renderer.render_wave_from(_soundfont_bytes(str(soundfont)), midi)
    audio, rate = decode_wav(wav, where="midirenderer output")
    return resample(downmix(audio), rate, SAMPLE_RATE)


def _fit(audio: np.ndarray, samples: int) -> np.ndarray:
    if len(audio) >= samples:
        return audio[:samples]
    return np.concatenate([audio, np.zeros(samples - len(audio), dtype=audio.dtype)])


def _to_pcm16(clip: np.ndarray) -> np.ndarray:
    # Peak-normalise each clip, as the original probing did when it loaded clips.
    peak = float(np.abs(clip).max(initial=0.0))
    if peak == 0.0:
        return np.zeros(len(clip), dtype="<i2")
    return np.round(clip * (32767.0 / peak)).astype("<i2")


def _write_atomic(path: Path, data: bytes) -> None:
    # temp file in the same folder + os.replace: a file under its final name is always complete
    # (os.open with 0o666 rather than mkstemp's 0o600, so the umask decides as for any file)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _wav_bytes(pcm: np.ndarray) -> bytes:
    return encode_wav(pcm, SAMPLE_RATE)


_WAV_SIZE = len(_wav_bytes(np.zeros(CLIP_SAMPLES, dtype="<i2")))


def _clip_done(folder: Path, clip: ClipSpec) -> bool:
    wav = folder / clip.wav_name
    return (folder / clip.midi_name).is_file() and wav.is_file() and wav.stat().st_size == _WAV_SIZE


def _wav_is_silent(path: Path) -> bool:
    audio, _ = decode_wav(path.read_bytes(), where=str(path))
    return not np.any(audio)


def _render_group(folder: Path, soundfont: Path, clips: tuple[ClipSpec, ...]) -> list[tuple[str, bool]]:
    """Render one MIDI file and write the clips cut from it -> [(stem, is_silent)]."""
    midi = score_to_midi(clips[0].score)
    _write_atomic(folder / clips[0].midi_name, midi)
    audio = _fit(_render_midi(midi, soundfont), int(round(clips[0].source_seconds * SAMPLE_RATE)))
    results = []
    for clip in clips:
        pcm = _to_pcm16(audio[clip.crop_start : clip.crop_start + CLIP_SAMPLES])
        _write_atomic(folder / clip.wav_name, _wav_bytes(pcm))
        results.append((clip.stem, not np.any(pcm)))
    return results


def _render_batch(folder: str, soundfont: str, groups: tuple[tuple[ClipSpec, ...], ...]) -> list[tuple[str, bool]]:
    """Worker entry point: several groups per task, so inter-process traffic stays small."""
    return [result for clips in groups for result in _render_group(Path(folder), Path(soundfont), clips)]


# --------------------------------------------------------------------------------------------
# The dataset


def _stamp(concept: str, seed: int, soundfont: Path) -> dict:
    """What the cached clips of a concept folder depend on; a mismatch means render again."""
    digest = hashlib.sha256(_soundfont_bytes(str(soundfont))).hexdigest()
    cropped = concept in ("tempos", "time_signatures")
    _require("midirenderer", "midirenderer")
    return {
        "render_version": RENDER_VERSION,
        "seed": seed if cropped else None,  # only the crops depend on it
        "soundfont_sha256": digest,
        "midirenderer": importlib.metadata.version("midirenderer"),
    }


def _prepare_folder(folder: Path, plan: list[ClipSpec], stamp: dict) -> None:
    # Clips are trusted only if every one of them was written under the same stamp. On a mismatch
    # the planned files are removed before the new stamp is written, so an interrupted re-render
    # never leaves old and new clips side by side under a stamp that vouches for both.
    folder.mkdir(parents=True, exist_ok=True)
    stamp_path = folder / _STAMP_NAME
    try:
        previous = json.loads(stamp_path.read_text())
    except (FileNotFoundError, ValueError):
        previous = None
    if previous == stamp:
        return
    if previous is None and ((folder / "info.csv").exists() or any(
        (folder / clip.wav_name).exists() or (folder / clip.midi_name).exists() for clip in plan
    )):
        # e.g. an original SynTheory download: never delete what this renderer did not write
        raise FileExistsError(
            f"{folder} holds SynTheory files that this renderer did not write (no {_STAMP_NAME}); "
            f"render into another folder or remove this one"
        )
    for clip in plan:
        (folder / clip.wav_name).unlink(missing_ok=True)
        (folder / clip.midi_name).unlink(missing_ok=True)
    (folder / "info.csv").unlink(missing_ok=True)
    _write_atomic(stamp_path, (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode())


def _write_info_csv(folder: Path, concept: str, plan: list[ClipSpec], soundfont_name: str,
                    silent: Mapping[str, bool]) -> None:  # fmt: skip
    columns = INFO_COLUMNS[concept]
    buffer = io.StringIO()
    # pandas' to_csv conventions (the original's writer): minimal quoting, "\n", True/False
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row_id, clip in enumerate(plan):
        values: dict[str, InfoValue] = dict(clip.columns)
        values.update(row_id=row_id, synth_soundfont=soundfont_name, is_silent=silent[clip.stem])
        writer.writerow([str(values[column]) for column in columns])
    _write_atomic(folder / "info.csv", buffer.getvalue().encode("utf-8"))


def _groups(plan: list[ClipSpec]) -> list[list[ClipSpec]]:
    # crops of one click track are consecutive in the plan
    groups: list[list[ClipSpec]] = []
    for clip in plan:
        if groups and groups[-1][0].midi_stem == clip.midi_stem:
            groups[-1].append(clip)
        else:
            groups.append([clip])
    return groups


def render_dataset(
    out_dir: str | os.PathLike,
    concepts: Sequence[str] = CONCEPTS,
    preset: str | Preset = "quick",
    seed: int = 0,
    workers: int | None = None,
    soundfont: str | os.PathLike = DEFAULT_SOUNDFONT,
    progress: bool = True,
) -> dict[str, int]:
    """Render SynTheory concepts into `out_dir/<concept>/` (.mid, .wav, info.csv); returns the
    number of clips per concept.

    Resumable: a clip whose .mid and complete .wav exist (from a render with the same soundfont,
    code version and, for cropped concepts, seed) is not rendered again. Files are written
    atomically; each concept's info.csv is written from the plan once all its clips exist.
    `workers` processes render in parallel (default: all cores; 1 renders in this process).
    """
    preset = _resolve_preset(preset)
    unknown = [concept for concept in concepts if concept not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; expected among {', '.join(CONCEPTS)}")
    soundfont = _check_soundfont(soundfont).resolve()
    _require("mido", "mido")
    tqdm = _require("tqdm", "tqdm").tqdm
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    out_dir = Path(out_dir)

    counts: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        executor: ProcessPoolExecutor | None = None
        for concept in concepts:
            folder = out_dir / concept
            plan = plan_clips(concept, preset, seed)
            _prepare_folder(folder, plan, _stamp(concept, seed, soundfont))

            todo: list[tuple[ClipSpec, ...]] = []
            silent: dict[str, bool] = {}
            for group in _groups(plan):
                missing = tuple(clip for clip in group if not _clip_done(folder, clip))
                if missing:
                    todo.append(missing)
                done = {clip.stem for clip in missing}
                for clip in group:
                    if clip.stem not in done:  # already rendered: is_silent from the file
                        silent[clip.stem] = _wav_is_silent(folder / clip.wav_name)

            pending = sum(len(group) for group in todo)
            with tqdm(total=len(plan), initial=len(plan) - pending, desc=concept, unit="clip",
                      disable=not progress) as bar:  # fmt: skip
                if workers > 1 and len(todo) > 1:
                    if executor is None:
                        # spawn, not fork: the parent may run torch's thread pools
                        executor = stack.enter_context(
                            ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
                        )
                    results = _run_in_pool(executor, folder, soundfont, todo, workers)
                else:
                    results = (_render_group(folder, soundfont, group) for group in todo)
                for rendered in results:
                    silent.update(rendered)
                    bar.update(len(rendered))

            _write_info_csv(folder, concept, plan, soundfont.name, silent)
            counts[concept] = len(plan)
    return counts


def _run_in_pool(executor: ProcessPoolExecutor, folder: Path, soundfont: Path,
                 todo: list[tuple[ClipSpec, ...]], workers: int) -> Iterator[list[tuple[str, bool]]]:  # fmt: skip
    size = max(1, min(16, len(todo) // (workers * 8)))
    futures = [
        executor.submit(_render_batch, str(folder), str(soundfont), tuple(todo[i : i + size]))
        for i in range(0, len(todo), size)
    ]
    try:
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool as error:
        raise RuntimeError(
            "SynTheory render workers stopped unexpectedly. Worker processes are started with "
            "'spawn', which re-imports the main script: run from a file with an "
            "`if __name__ == '__main__':` guard (not from stdin), or pass workers=1."
        ) from error
    finally:
        for future in futures:  # on an error or Ctrl-C, drop what has not started
            future.cancel()
