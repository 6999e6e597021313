"""SynTheory: plans (no audio), small renders checked by independent analysis, resumability,
determinism, the loader and its errors, WAV reading and resampling.

Rendering tests need the TimGM6mb soundfont (Debian package timgm6mb-soundfont) and are skipped
without it; everything else runs anywhere.
"""

from __future__ import annotations

import csv
import functools
import io
import struct
import time
import wave
from pathlib import Path

import mido
import numpy as np
import pytest

from musicrfm.probes import syntheory as st
from musicrfm.evaluation.audio_checks import beat_period, fft_chroma
from musicrfm.probes.dataset import LABEL_COLUMNS, InfoCsvError, load_audio, load_concept, resample
from musicrfm.protocol.wav import decode_wav

needs_soundfont = pytest.mark.skipif(
    not Path(st.DEFAULT_SOUNDFONT).is_file(),
    reason=f"{st.DEFAULT_SOUNDFONT} missing: apt-get install timgm6mb-soundfont",
)

# Sizes the original generators document (brown-palm/syntheory, dataset/synthetic/*.py).
ORIGINAL_SIZES = {
    "notes": 9_936,
    "intervals": 39_744,
    "scales": 15_456,
    "chords": 13_248,
    "chord_progressions": 20_976,
    "tempos": 4_025,
    "time_signatures": 1_200,
}
CLASS_COUNTS = {
    "notes": 12,
    "intervals": 12,
    "scales": 7,
    "chords": 4,
    "chord_progressions": 19,
    "tempos": 161,
    "time_signatures": 8,
}
QUICK_SIZES = {
    "notes": 360,
    "intervals": 2_592,
    "scales": 1_008,
    "chords": 864,
    "chord_progressions": 1_368,
    "tempos": 805,
    "time_signatures": 240,
}


# ------------------------------------------------------------------------------------------
# Plans


def test_concepts_use_the_original_folder_names():
    assert st.CONCEPTS == tuple(ORIGINAL_SIZES)


def test_the_92_programs():
    ranges = [(0, 7), (10, 13), (15, 20), (24, 30), (32, 46), (48, 54), (56, 76), (79, 85), (87, 95), (104, 111)]
    expected = [p for lo, hi in ranges for p in range(lo, hi + 1)]
    assert list(st.PROGRAMS) == expected and len(expected) == 92
    assert st.PRESETS["full"].programs == tuple(expected)
    quick = st.PRESETS["quick"].programs
    assert len({st.PROGRAMS[p].category for p in quick}) == len(quick) == 6


@pytest.mark.parametrize("concept", st.CONCEPTS)
def test_full_preset_has_the_original_sizes_and_quick_keeps_every_class(concept):
    full = _full_plan(concept)
    quick = st.plan_clips(concept, "quick", seed=0)
    assert len(full) == ORIGINAL_SIZES[concept]
    assert len(quick) == QUICK_SIZES[concept]
    full_classes = {clip.label for clip in full}
    assert len(full_classes) == CLASS_COUNTS[concept]
    assert {clip.label for clip in quick} == full_classes
    for plan in (full, quick):
        assert len({clip.stem for clip in plan}) == len(plan)  # no two clips share a file
        # the label is the loader's label column, so plans and info.csv agree
        column = LABEL_COLUMNS[concept]
        assert all(str(dict(clip.columns)[column]) == clip.label for clip in plan)
        # every info.csv column is planned except those filled at render time
        planned = set(dict(plan[0].columns)) | {"row_id", "synth_soundfont", "is_silent"}
        assert planned == set(st.INFO_COLUMNS[concept])


@pytest.mark.parametrize("concept", st.CONCEPTS)
def test_plans_are_deterministic(concept):
    assert st.plan_clips(concept, "quick", seed=3) == st.plan_clips(concept, "quick", seed=3)


@pytest.mark.parametrize("concept", ["tempos", "time_signatures"])
def test_seed_moves_the_crops_and_only_the_crops(concept):
    a = _full_plan(concept)
    b = st.plan_clips(concept, "full", seed=1)
    assert [clip.stem for clip in a] == [clip.stem for clip in b]
    starts_a = np.array([clip.crop_start for clip in a])
    starts_b = np.array([clip.crop_start for clip in b])
    assert np.mean(starts_a != starts_b) > 0.99
    latest = (a[0].source_seconds - st.CLIP_SECONDS) * st.SAMPLE_RATE
    assert starts_a.min() >= 0 and starts_a.max() <= latest
    assert len(set(starts_a.tolist())) > 0.9 * len(a)  # crops of one track differ
    # a crop depends on its own name only: the quick preset cuts the same crops
    quick = {clip.stem: clip.crop_start for clip in st.plan_clips(concept, "quick", seed=0)}
    assert all(quick[clip.stem] == clip.crop_start for clip in a if clip.stem in quick)
    # the tonal concepts do not depend on the seed
    assert st.plan_clips("notes", "quick", seed=0) == st.plan_clips("notes", "quick", seed=1)


def _pitches(clip: st.ClipSpec) -> list[list[int]]:
    """Pitches grouped by onset."""
    groups: dict[int, list[int]] = {}
    for note in clip.score.notes:
        groups.setdefault(note.start, []).append(note.pitch)
    return [groups[start] for start in sorted(groups)]


@functools.cache
def _full_plan(concept: str) -> tuple[st.ClipSpec, ...]:
    return tuple(st.plan_clips(concept, "full", seed=0))


def _clip(concept: str, stem_prefix: str) -> st.ClipSpec:
    return next(c for c in _full_plan(concept) if c.stem.startswith(stem_prefix))


def test_voicings_follow_the_original():
    assert _pitches(_clip("notes", "61_1_C#_0_"))[0] == [61]
    assert _pitches(_clip("intervals", "D_7_UP_0_")) == [[62], [69]] * 4
    assert _pitches(_clip("intervals", "D_7_DOWN_0_")) == [[69], [62]] * 4
    assert _pitches(_clip("intervals", "D_7_UNISON_0_")) == [[62, 69]] * 8
    # keys sit around middle C: F# and above start below it
    assert _pitches(_clip("scales", "D_dorian_UP_0_")) == [[p] for p in (62, 64, 65, 67, 69, 71, 72, 74)]
    assert _pitches(_clip("scales", "A_locrian_DOWN_0_"))[0] == [69]
    assert _pitches(_clip("chords", "C_major_5_0_"))[0] == [60, 64, 67]
    assert _pitches(_clip("chords", "C_minor_6_0_"))[0] == [63, 67, 72]
    assert _pitches(_clip("chords", "C_dim_64_0_"))[0] == [66, 72, 75]
    assert _pitches(_clip("chords", "C_aug_5_0_"))[0] == [60, 64, 68]
    # the augmented triad is the III of the harmonic minor a minor third below: its register
    # follows that key's tonic, as in the original (G#: F harmonic minor, tonic 65)
    assert _pitches(_clip("chords", "G#_aug_5_0_"))[0] == [68, 72, 76]
    assert _pitches(_clip("chords", "G#_major_5_0_"))[0] == [56, 60, 63]
    # chord tones are tonic + mode offset with no octave wrap (IV in C is F4 A4 C4)
    assert _pitches(_clip("chord_progressions", "C_ionian_1-4-5-1_0_")) == [
        [60, 64, 67], [65, 69, 60], [67, 71, 62], [60, 64, 67],
    ]  # fmt: skip
    assert _clip("chord_progressions", "A_aeolian_1-6-3-7_0_").label == "aeolian-(1, 6, 3, 7)"


def test_midi_conventions():
    for concept in st.CONCEPTS[:5]:
        clip = st.plan_clips(concept, "quick")[0]
        midi = mido.MidiFile(file=io.BytesIO(st.score_to_midi(clip.score)))
        assert midi.ticks_per_beat == 480 and len(midi.tracks) == 1
        assert midi.length == pytest.approx(4.0)
        messages = list(midi.tracks[0])
        assert [m.tempo for m in messages if m.type == "set_tempo"] == [500_000]  # 120 BPM
        notes = [m for m in messages if m.type in ("note_on", "note_off")]
        assert {m.channel for m in notes} == {2} and {m.velocity for m in notes} == {64}
        assert [m.program for m in messages if m.type == "program_change"] == [clip.score.program]
    for concept, seconds in (("tempos", 20.0), ("time_signatures", 30.0)):
        for clip in st.plan_clips(concept, "quick"):
            assert clip.score.seconds >= seconds  # long enough to cut the original's length
    clicks = _full_plan("time_signatures")
    six_eight = next(c for c in clicks if c.label == "(6, 8)" and c.stem.endswith("default_reverb_level_2_offset_0"))
    downbeats = [n.start for n in six_eight.score.notes if n.pitch == 37]
    assert downbeats[:2] == [0, 6 * 240]  # eighth-note clicks, accent every 6
    assert six_eight.score.reverb == 127 and six_eight.score.channel == 9


def test_preset_validation():
    with pytest.raises(ValueError, match="not among the 92"):
        st.Preset("bad", programs=(8,))  # celesta: excluded by the original
    with pytest.raises(ValueError, match="click_setups"):
        st.Preset("bad", programs=(0,), click_setups=("cowbell",))
    with pytest.raises(ValueError, match="unknown preset"):
        st.plan_clips("notes", "huge")
    with pytest.raises(ValueError, match="unknown concept"):
        st.plan_clips("keys", "quick")


def test_missing_soundfont_is_a_clear_error(tmp_path):
    with pytest.raises(st.SoundfontNotFoundError) as caught:
        st.render_dataset(tmp_path / "out", soundfont=tmp_path / "missing.sf2", progress=False)
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert "timgm6mb-soundfont" in message and "--soundfont" in message and "missing.sf2" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------
# Renders (independent checks from musicrfm.evaluation.audio_checks: FFT chroma, onset autocorrelation; a direct
# render of the track)

SMALL = st.Preset(
    "small",
    programs=(0, 73),  # piano, flute
    note_octaves=(3, 4, 5),
    tempo_bpms=(60, 150),
    click_setups=("default", "woodblock_light"),
    tempo_crops=2,
    reverb_levels=(0,),
    signature_crops=1,
)
PIANO = st.Preset("piano", programs=(0,))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("syntheory")
    counts = st.render_dataset(root, ("notes", "tempos", "time_signatures"), SMALL, seed=0, workers=2, progress=False)
    counts.update(st.render_dataset(root, ("chords",), PIANO, seed=0, workers=2, progress=False))
    return root, counts


@needs_soundfont
def test_render_files_format_and_info_csv_round_trip(rendered):
    root, counts = rendered
    assert counts == {"notes": 72, "tempos": 8, "time_signatures": 16, "chords": 144}
    for concept, preset in (("notes", SMALL), ("tempos", SMALL), ("time_signatures", SMALL), ("chords", PIANO)):
        plan = st.plan_clips(concept, preset, seed=0)
        data = load_concept(root, concept)
        with open(data.info_csv, newline="") as handle:
            assert next(csv.reader(handle)) == list(st.INFO_COLUMNS[concept])
        assert data.labels == tuple(clip.label for clip in plan)
        assert [p.name for p in data.paths] == [clip.wav_name for clip in plan]
        assert set(data.classes) == {clip.label for clip in plan}
        assert not any(data.silent)
        for clip, path in zip(plan, data.paths):
            assert (root / concept / clip.midi_name).is_file()
            with wave.open(str(path)) as wav:
                assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 32000)
                assert wav.getnframes() == 4 * 32000
                pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
            assert np.abs(pcm.astype(np.int32)).max() == 32767  # peak-normalised
    tempos = load_concept(root, "tempos")
    assert tempos.targets.tolist() == [60.0] * 4 + [150.0] * 4
    assert tempos.classes == ("60", "150")
    notes = load_concept(root, "notes")
    assert notes.classes == st.PITCH_NAMES
    assert all(notes.classes[i] == label for i, label in zip(notes.label_ids, notes.labels))


@needs_soundfont
def test_rendered_notes_sound_their_pitch_class(rendered):
    root, _ = rendered
    data = load_concept(root, "notes")
    predicted = [st.PITCH_NAMES[int(np.argmax(fft_chroma(load_audio(p))))] for p in data.paths]
    accuracy = np.mean([p == label for p, label in zip(predicted, data.labels)])
    assert accuracy >= 0.9, accuracy


@needs_soundfont
def test_rendered_chords_contain_their_root(rendered):
    root, _ = rendered
    data = load_concept(root, "chords")
    hits = []
    for path, row in zip(data.paths, data.rows):
        strongest = np.argsort(fft_chroma(load_audio(path)))[::-1][:3]
        hits.append(int(row["root_note_pitch_class"]) in strongest)
    assert np.mean(hits) >= 0.9, np.mean(hits)


@needs_soundfont
def test_rendered_clicks_keep_their_tempo(rendered):
    root, _ = rendered
    data = load_concept(root, "tempos")
    for path, bpm in zip(data.paths, data.targets):
        assert beat_period(load_audio(path)) == pytest.approx(60.0 / bpm, rel=0.03), path.name


@needs_soundfont
def test_render_clip_is_what_render_dataset_writes(rendered):
    root, _ = rendered
    for concept, index in (("notes", 7), ("tempos", 5)):
        clip = st.plan_clips(concept, SMALL, seed=0)[index]
        written = load_audio(root / concept / clip.wav_name)
        np.testing.assert_array_equal(st.render_clip(clip), written)


@needs_soundfont
def test_crops_are_cut_where_info_csv_says(rendered):
    root, _ = rendered
    data = load_concept(root, "time_signatures")
    plan = {clip.wav_name: clip for clip in st.plan_clips("time_signatures", SMALL, seed=0)}
    for path, row in list(zip(data.paths, data.rows))[::5]:
        clip = plan[path.name]
        full = st.render_score(clip.score)
        start = round(float(row["offset_time"]) * st.SAMPLE_RATE)
        assert start == clip.crop_start
        segment = full[start : start + st.CLIP_SAMPLES]
        np.testing.assert_allclose(load_audio(path), segment / np.abs(segment).max(), atol=2e-4)


@needs_soundfont
def test_resume_skips_finished_clips_and_rerenders_a_deleted_one(rendered):
    root, _ = rendered
    folder = root / "notes"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.wav")}
    started = time.perf_counter()
    st.render_dataset(root, ("notes",), SMALL, seed=0, workers=2, progress=False)
    assert time.perf_counter() - started < 3.0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.wav")} == before

    victim = sorted(before)[5]
    (folder / victim).unlink()
    st.render_dataset(root, ("notes",), SMALL, seed=0, workers=2, progress=False)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.wav")}
    changed = [name for name in after if after[name][0] != before[name][0]]
    assert changed == [victim]
    assert after[victim][1] == before[victim][1]  # rendered again, byte for byte
    assert not list(folder.glob(".*.part"))  # no temporary files left behind


@needs_soundfont
def test_same_seed_same_bytes(rendered, tmp_path):
    root, _ = rendered
    st.render_dataset(tmp_path, ("notes", "tempos"), SMALL, seed=0, workers=1, progress=False)
    for concept in ("notes", "tempos"):
        ours = sorted(p.name for p in (tmp_path / concept).iterdir())
        assert ours == sorted(p.name for p in (root / concept).iterdir())
        for name in ours:
            assert (tmp_path / concept / name).read_bytes() == (root / concept / name).read_bytes(), name


@needs_soundfont
def test_another_seed_replaces_the_cached_crops(tmp_path):
    one = st.Preset("one", programs=(0,), tempo_bpms=(120,), click_setups=("taiko",), tempo_crops=1)
    st.render_dataset(tmp_path, ("tempos",), one, seed=0, workers=1, progress=False)
    first = load_concept(tmp_path, "tempos")
    audio_0 = load_audio(first.paths[0])
    st.render_dataset(tmp_path, ("tempos",), one, seed=1, workers=1, progress=False)
    second = load_concept(tmp_path, "tempos")
    assert first.rows[0]["offset_time"] != second.rows[0]["offset_time"]
    assert not np.array_equal(audio_0, load_audio(second.paths[0]))
    assert second.rows[0]["offset_time"] == str(st.plan_clips("tempos", one, seed=1)[0].crop_start / 32000)


@needs_soundfont
def test_never_overwrites_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "info.csv").write_text("row_id\n")
    with pytest.raises(FileExistsError, match="did not write"):
        st.render_dataset(tmp_path, ("notes",), PIANO, workers=1, progress=False)
    assert (tmp_path / "notes" / "info.csv").read_text() == "row_id\n"


# ------------------------------------------------------------------------------------------
# Loader on the original layout, and its errors


def _float_wav(samples: np.ndarray, rate: int) -> bytes:
    """A 32-bit float stereo WAV, as the original renderer wrote them."""
    frames = np.ascontiguousarray(samples, dtype="<f4")
    data = frames.tobytes()
    channels = frames.shape[1]
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _write_original_tempos(root: Path, rows: list[list[str]]) -> Path:
    folder = root / "tempos"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "info.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(st.INFO_COLUMNS["tempos"])
        writer.writerows(rows)
    return folder


def test_loader_reads_the_original_layout(tmp_path):
    rate = 44_100
    t = np.arange(int(4.5 * rate)) / rate
    tone = 0.25 * np.sin(2 * np.pi * 440.0 * t)
    rows = []
    for i, bpm in enumerate((97, 50)):
        offset = f"{bpm}_bpm_taiko_offset_0.wav"
        rows.append([str(i), str(bpm), "taiko", "116", f"{bpm}_bpm_taiko.mid", f"{bpm}_bpm_taiko.wav",
                     offset, "3.14", "TimGM6mb.sf2", "False"])  # fmt: skip
    folder = _write_original_tempos(tmp_path, rows)
    for row in rows:
        (folder / row[6]).write_bytes(_float_wav(np.stack([tone, tone], axis=1), rate))

    data = load_concept(tmp_path, "tempos")
    assert [p.name for p in data.paths] == ["97_bpm_taiko_offset_0.wav", "50_bpm_taiko_offset_0.wav"]
    assert data.classes == ("50", "97") and data.label_ids.tolist() == [1, 0]
    assert data.targets.dtype == np.float32 and data.targets.tolist() == [97.0, 50.0]

    audio = load_audio(data.paths[0])
    assert audio.dtype == np.float32 and audio.shape == (int(4.5 * 32000),)
    expected = 0.25 * np.sin(2 * np.pi * 440.0 * np.arange(len(audio)) / 32000)
    np.testing.assert_allclose(audio[3200:-3200], expected[3200:-3200], atol=1e-4)
    normalised = load_audio(data.paths[0], peak_normalize=True)
    assert np.abs(normalised).max() == pytest.approx(1.0)


def test_loader_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tempos/info\.csv"):
        load_concept(tmp_path, "tempos")
    folder = tmp_path / "tempos"
    folder.mkdir()
    info = folder / "info.csv"

    info.write_text("")
    with pytest.raises(InfoCsvError, match="empty"):
        load_concept(tmp_path, "tempos")
    info.write_text("row_id,synth_file_path\n0,a.wav\n")
    with pytest.raises(InfoCsvError, match="missing column.*bpm"):
        load_concept(tmp_path, "tempos")
    info.write_text("row_id,bpm,synth_file_path\n")
    with pytest.raises(InfoCsvError, match="no clips"):
        load_concept(tmp_path, "tempos")
    info.write_text("row_id,bpm,synth_file_path\n0,60,a.wav\n1,61\n")
    with pytest.raises(InfoCsvError, match=r"info\.csv:3: wrong number of fields"):
        load_concept(tmp_path, "tempos")
    info.write_text("row_id,bpm,synth_file_path\n0,sixty,a.wav\n")
    with pytest.raises(InfoCsvError, match="sixty"):
        load_concept(tmp_path, "tempos")
    info.write_text("row_id,bpm,synth_file_path\n0,60,a.wav\n")
    with pytest.raises(FileNotFoundError, match=r"1 listed clip\(s\) missing: .*a\.wav"):
        load_concept(tmp_path, "tempos")
    assert load_concept(tmp_path, "tempos", check_files=False).paths == (folder / "a.wav",)
    with pytest.raises(ValueError, match="unknown concept"):
        load_concept(tmp_path, "keys")


def test_decode_wav_formats():
    values = np.array([[0.5], [-0.25], [0.0]])
    pcm24 = b"".join(int(v * 2**23).to_bytes(3, "little", signed=True) for v in values[:, 0])
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 24000, 3, 24)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm24)) + pcm24
    audio, rate = decode_wav(b"RIFF" + struct.pack("<I", len(body)) + body)
    assert rate == 8000 and np.allclose(audio, values)
    audio, rate = decode_wav(_float_wav(np.array([[0.5, -0.5]]), 22050))
    assert rate == 22050 and audio.tolist() == [[0.5, -0.5]]
    with pytest.raises(ValueError, match="not a RIFF/WAVE"):
        decode_wav(b"OggS....")


@pytest.mark.parametrize("rates", [(48_000, 32_000), (44_100, 32_000), (16_000, 32_000)])
def test_resample_is_accurate_in_band_and_removes_what_cannot_fit(rates):
    source, target = rates
    t = np.arange(2 * source) / source
    for freq in (220.0, 3_000.0, 0.35 * min(source, target)):  # up to 70% of the lower Nyquist
        out = resample(np.sin(2 * np.pi * freq * t), source, target)
        assert len(out) == 2 * target
        expected = np.sin(2 * np.pi * freq * np.arange(len(out)) / target)
        np.testing.assert_allclose(out[target // 10 : -target // 10], expected[target // 10 : -target // 10], atol=1e-4)
    if source > target:  # a tone above the new Nyquist must not alias back in
        out = resample(np.sin(2 * np.pi * (source + target) / 4 * t), source, target)
        assert np.sqrt(np.mean(out[target // 10 : -target // 10] ** 2)) < 1e-3
