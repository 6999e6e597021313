"""The live control state and the stream that applies it at exact steps (no network here)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.steering import Schedule
from musicrfm.server.offline import end_step, play_messages, run_stream
from musicrfm.protocol.wire import ProtocolError
from musicrfm.server.state import ControlState, apply_patch
from musicrfm.engine.norms import with_layer_norms
from musicrfm.server.stream import Cause, Stream

KEYS = {"notes:C", "notes:G"}
CAUSE = Cause("test")
STRONG = 2.0  # twice each layer's typical norm (relative units): a weak push changes few of tiny-random's tokens


@pytest.fixture(scope="module")
def bank(tiny):
    fp = tiny.fingerprint
    g = torch.Generator().manual_seed(0)
    bank = DirectionBank.from_arrays("notes", ["C", "G"], torch.randn(2, fp.num_layers, fp.hidden_size, generator=g),
                                     torch.rand(2, fp.num_layers, generator=g), fp, method="test", pooling="mean")
    return with_layer_norms(bank, tiny)


# --- the state ---------------------------------------------------------------------------------------

def test_patch_merges_and_round_trips():
    s = apply_patch(ControlState(), {"prompt": "a", "directions": {"notes:C": {"coefficient": 0.5}},
                                     "gate": {"p": 0.3}, "layers": "topk:k=2", "sampling": {"top_k": 10}},
                    step=0, known_keys=KEYS)
    s = apply_patch(s, {"directions": {"notes:C": {"active": False}, "notes:G": {"coefficient": -1}},
                        "sampling": {"temperature": 0.5}}, step=0, known_keys=KEYS)
    assert s.directions["notes:C"].coefficient == 0.5 and s.directions["notes:C"].active is False
    assert s.directions["notes:G"].coefficient == -1.0
    assert (s.sampling.top_k, s.sampling.temperature, s.steering.gate_p, s.steering.layers.mode, s.steering.layers.k) == (10, 0.5, 0.3, "topk", 2)
    assert ControlState.from_dict(s.to_dict(), KEYS) == s
    removed = apply_patch(s, {"directions": {"notes:C": None}}, step=0, known_keys=KEYS)
    assert list(removed.directions) == ["notes:G"]


@pytest.mark.parametrize("patch, message", [
    ({"directions": {"notes:H": {"coefficient": 1}}}, "unknown direction 'notes:H'"),
    ({"directions": {"notes:C": {"coefficient": float("nan")}}}, "must be finite"),
    ({"directions": {"notes:C": {"coefficient": float("inf")}}}, "must be finite"),
    ({"directions": {"notes:C": {"schedule": {"kind": "sine"}}}}, "needs a 'coefficient'"),
    ({"directions": {"notes:C": None}}, "cannot remove"),
    ({"directions": {"notes:C": {"coefficient": 1, "gain": 2}}}, "unknown field 'gain'"),
    ({"directions": {"notes:C": {"coefficient": 1, "active": "yes"}}}, "true or false"),
    ({"directions": {"notes:C": {"coefficient": 1, "schedule": {"kind": "wobble"}}}}, "wobble"),
    ({"gate": {"p": 1.5}}, "gate_p is a probability in"),
    ({"gate": 0.3}, "gate must be an object"),
    ({"layers": "topk:k=-1"}, "layers"),
    ({"sampling": {"temperature": 0}}, "temperature"),
    ({"sampling": {"top_k": 2.5}}, "top_k"),
    ({"volume": 3}, "unknown field 'volume'"),
    ({"prompt": 7}, "prompt must be a string"),
    ({"rule": "multiply"}, "rule must be one of"),
])
def test_bad_patches_name_the_problem_and_change_nothing(patch, message):
    s = ControlState()
    with pytest.raises(ProtocolError, match=message):
        apply_patch(s, patch, step=0, known_keys=KEYS)
    assert s == ControlState()


def test_a_live_schedule_is_relative_to_the_step_it_applies_at():
    s = apply_patch(ControlState(), {"directions": {"notes:C": {"coefficient": 1, "schedule": {"kind": "fade_in",
                                                                                                "length": 100}}}},
                    step=420, known_keys=KEYS)
    schedule = s.directions["notes:C"].schedule
    assert schedule.start == 420 and schedule(420) == 0.0 and schedule(520) == 1.0
    assert math.isclose(schedule(470), Schedule("fade_in", start=0, length=100)(50))


# --- the stream --------------------------------------------------------------------------------------

def drive(stream: Stream, chunk_steps: int) -> tuple[np.ndarray, list]:
    """Play until the stream stops itself; check the audio is contiguous."""
    applied, pieces, expected = [], [], 0
    first = stream.apply_due()
    applied += first.applied
    while stream.state.playback == "playing":
        chunk = stream.generate(chunk_steps)
        assert chunk.first_sample == expected
        expected += chunk.audio.shape[0]
        pieces.append(chunk.audio)
        applied += chunk.applied
    return np.concatenate(pieces), applied


def scripted(tiny, bank) -> Stream:
    s = Stream(tiny, bank)
    s.submit({"type": "set", "directions": {"notes:C": {"coefficient": STRONG}}, "at_step": 20}, CAUSE)
    s.submit({"type": "set", "directions": {"notes:C": {"coefficient": 0.0}}, "at_step": 45}, CAUSE)  # needs the cue before
    s.submit({"type": "set", "prompt": "dark drone", "at_step": 50}, CAUSE)
    s.submit({"type": "transport", "command": "stop", "at_step": 80}, CAUSE)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    return s


def test_changes_apply_at_exactly_their_step(tiny, bank):
    s = scripted(tiny, bank)
    _, applied = drive(s, 7)
    assert [(a.step, a.cause.via) for a in applied] == [(0, "test"), (20, "test"), (45, "test"), (50, "test"),
                                                        (80, "test")]
    assert [a.version for a in applied] == [1, 2, 3, 4, 5]
    assert applied[-1].state.playback == "stopped"
    steered = s.finished_codes

    plain = Stream(tiny, bank)
    plain.submit({"type": "transport", "command": "stop", "at_step": 80}, CAUSE)
    plain.submit({"type": "transport", "command": "play"}, CAUSE)
    drive(plain, 80)
    unsteered = plain.finished_codes
    # Step s writes codebook 0 of frame s (and codebook k of frame s - k): before step 20 nothing differs.
    assert torch.equal(steered[:, :17], unsteered[:, :17])
    assert not torch.equal(steered[0, 20:45], unsteered[0, 20:45])
    assert steered.shape[1] == 80 - tiny.num_codebooks + 1


def test_tokens_do_not_depend_on_chunking_and_offline_equals_live_driving(tiny, bank):
    a = scripted(tiny, bank)
    audio_a, _ = drive(a, 3)
    b = scripted(tiny, bank)
    audio_b, _ = drive(b, 17)
    assert torch.equal(a.finished_codes, b.finished_codes)
    assert audio_a.shape == audio_b.shape and np.abs(audio_a - audio_b).max() < 1e-5

    frames = a.finished_codes.shape[1]
    messages = [{"type": "set", "directions": {"notes:C": {"coefficient": STRONG}}, "at_step": 20},
                {"type": "set", "directions": {"notes:C": {"coefficient": 0.0}}, "at_step": 45},
                {"type": "set", "prompt": "dark drone", "at_step": 50}]
    run = play_messages(tiny, bank, messages, frames, progress=False)
    assert torch.equal(run.codes, a.finished_codes)
    assert end_step(frames, tiny.num_codebooks) == 80


def test_bad_changes_are_refused_at_submit_and_never_queued(tiny, bank):
    s = Stream(tiny, bank)
    for message, text in [({"type": "set", "directions": {"notes:X": {"coefficient": 1}}}, "unknown direction"),
                          ({"type": "set", "gate": {"p": float("nan")}}, "finite"),
                          ({"type": "set"}, "nothing to change"),
                          ({"type": "transport", "command": "rewind"}, "transport command"),
                          ({"type": "transport", "command": "play", "seed": 3}, "only reset"),
                          ({"type": "set", "prompt": "x", "at_step": -4}, "at_step"),
                          ({"type": "set", "directions": {"notes:C": {"active": True}}, "at_step": 5}, "coefficient")]:
        with pytest.raises(ProtocolError, match=text):
            s.submit(message, CAUSE)
    assert s.pending == 0


def test_pause_holds_the_stream_and_play_resumes_it(tiny, bank):
    s = Stream(tiny, bank)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    first = s.generate(10)
    s.submit({"type": "transport", "command": "pause"}, CAUSE)
    held = s.generate(10)
    assert held.steps == (10, 10) and held.audio.size == 0 and s.state.playback == "paused"
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    more = s.generate(10)
    assert more.steps == (10, 20) and more.epoch == first.epoch == 0
    assert more.first_sample == first.first_sample + first.audio.size


def test_reset_starts_a_new_stream_with_its_seed(tiny, bank):
    s = Stream(tiny, bank)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    s.generate(30)
    s.submit({"type": "transport", "command": "reset", "seed": 9}, CAUSE)
    ended = s.generate(5)
    assert ended.ended and ended.epoch == 0 and ended.steps == (30, 30) and ended.audio.size > 0  # the decoder's tail
    assert s.epoch == 1 and s.step == 0 and s.samples_emitted == 0 and s.state.seed == 9
    after = s.generate(5)
    assert after.epoch == 1 and after.first_sample == 0 and after.steps == (0, 5)
    assert s.generator.seed == 9


def test_guidance_cannot_be_switched_on_mid_stream(tiny, bank):
    s = Stream(tiny, bank, ControlState(sampling=apply_patch(ControlState(), {"sampling": {"guidance_scale": 1.0}},
                                                             step=0).sampling))
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    with pytest.raises(ProtocolError, match="without guidance"):
        s.submit({"type": "set", "sampling": {"guidance_scale": 3.0}}, CAUSE)


def test_run_stream_needs_frames(tiny, bank):
    with pytest.raises(ValueError, match="frames"):
        run_stream(Stream(tiny, bank), 0)


def test_a_long_score_queues_in_order_but_out_of_order_changes_are_bounded(tiny, bank):
    from musicrfm.server.stream import MAX_OUT_OF_ORDER_CHANGES

    s = Stream(tiny, bank)
    s.submit({"type": "set", "directions": {"notes:C": {"coefficient": 1.0}}, "at_step": 1}, CAUSE)
    for i in range(300):  # a score's cues: each adjusts the direction an earlier cue added
        s.submit({"type": "set", "directions": {"notes:C": {"coefficient": i / 100}}, "at_step": 10 + i}, CAUSE)
    assert s.pending == 301
    with pytest.raises(ProtocolError, match="out of step order"):
        s.submit({"type": "set", "prompt": "back in time", "at_step": 5}, CAUSE)
    t = Stream(tiny, bank)
    for i in range(MAX_OUT_OF_ORDER_CHANGES):
        t.submit({"type": "set", "gate": {"p": 0.5}, "at_step": 1000 - i}, CAUSE)
    with pytest.raises(ProtocolError, match="too many changes"):
        t.submit({"type": "set", "gate": {"p": 0.5}, "at_step": 10}, CAUSE)


def test_the_state_checked_at_submit_is_the_state_applied_and_its_plan_compiled_once(tiny, bank, monkeypatch):
    from musicrfm.engine.steering import SteeringPlan

    s = Stream(tiny, bank)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    s.generate(3)
    compiled = []
    real = SteeringPlan.compile.__func__
    monkeypatch.setattr(SteeringPlan, "compile", classmethod(
        lambda cls, spec, *a, **kw: compiled.append(kw.get("reuse")) or real(cls, spec, *a, **kw)))
    added = s.submit({"type": "set", "directions": {"notes:C": {"coefficient": 1.0, "schedule": "fade_in:length=10"}}},
                     CAUSE)
    s.generate(2)
    assert s.history.last.step == 3 and s.history.last.state.steering is added.state.steering  # not checked again
    assert added.state.directions["notes:C"].schedule.start == 3  # relative to the step it applied at
    assert compiled == [None]  # compiled once, on the CPU, when it was submitted
    weighted = s.generator.plan.weighted
    knob = s.submit({"type": "set", "directions": {"notes:C": {"coefficient": 2.0}}}, CAUSE)
    s.generate(2)
    assert s.generator.plan.spec is knob.plan.spec and s.generator.plan.spec.controls[0].coefficient == 2.0
    assert s.generator.plan.weighted is weighted  # a knob turn re-uses the compiled directions, on the device


def test_changes_a_stop_moves_to_another_step_are_checked_on_what_they_meet(tiny, bank):
    s = Stream(tiny, bank)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    s.generate(5)
    s.submit({"type": "transport", "command": "stop"}, CAUSE)
    s.submit({"type": "set", "directions": {"notes:C": {"coefficient": 1.0, "schedule": "fade_in:length=10"}}}, CAUSE)
    s.submit({"type": "set", "directions": {"notes:G": {"coefficient": 0.5}}, "at_step": 8}, CAUSE)  # the next stream's
    chunk = s.generate(5)
    assert chunk.ended and [a.step for a in chunk.applied] == [5, 0]  # the stop, then the set on the stopped stream
    assert s.state.directions["notes:C"].schedule.start == 0  # checked for step 5, applied at 0: shifted by 0
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    s.generate(10)
    assert [json.loads(line)["step"] for line in s.history.lines()] == [0, 8] and list(s.state.directions) == ["notes:C", "notes:G"]


def test_a_change_sent_while_a_step_runs_is_checked_for_the_next_step(tiny, bank):
    s = Stream(tiny, bank)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    gen, sent = s.generator, []
    real = gen.engine.step

    def step(generators):  # the event loop's submit, racing the worker's step 4
        if gen.step == 4:
            sent.append(s.submit({"type": "set", "directions": {"notes:C": {"coefficient": 1.0,
                                                                            "schedule": "fade_in:length=10"}}}, CAUSE))
        real(generators)

    gen.engine.step = step
    s.generate(8)
    assert sent[0].step == 5 and s.history.last.step == 5 and s.history.last.state.steering is sent[0].state.steering
    assert s.state.directions["notes:C"].schedule.start == 5


# --- costly input: coalescing and a bounded history -------------------------------------------------------


def test_prompts_due_at_one_step_are_encoded_once(tiny, bank):
    """50 prompt changes that arrive between two steps: each is applied and echoed (a `state` each), but the
    generator encodes only the last prompt, once (2,000-character prompts at 5 a second once stopped the audio)."""
    s = Stream(tiny, bank)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    s.generate(2)
    gen, encoded = s.generator, []
    real = gen.decoder.encode_text
    gen.decoder.encode_text = lambda texts, **kw: encoded.append(list(texts)) or real(texts, **kw)
    for i in range(50):
        s.submit({"type": "set", "prompt": f"prompt {i} " + "x" * 1990}, CAUSE)
    chunk = s.generate(1)
    assert len(chunk.applied) == 50 and [a.step for a in chunk.applied] == [2] * 50
    assert len(encoded) == 1 and encoded[0][0].startswith("prompt 49 ") and gen.prompt == s.state.prompt
    # A prompt changed and changed back within one step encodes nothing.
    s.submit({"type": "set", "prompt": "other"}, CAUSE)
    s.submit({"type": "set", "prompt": s.state.prompt}, CAUSE)
    s.generate(1)
    assert len(encoded) == 1


def test_a_live_stream_paces_prompt_changes_by_what_encoding_them_costs(tiny, bank, monkeypatch):
    """A new prompt every step, each encoding taking 40 ms (a step is 20 ms): a live stream (`pace_prompts`)
    holds a prompt change, and every change after it, until PROMPT_ENCODE_SHARE of the time has gone to encoding;
    whatever came meanwhile applies together, in order, and only its last prompt is encoded. Every change is still
    applied and echoed, in the order it came, at the step it applied at (which the history, and so a recording's
    replay, keeps). Offline (no pacing) each step's prompt is encoded."""
    import time as clock

    from musicrfm.server.stream import PROMPT_ENCODE_SHARE

    from musicrfm.server import stream as stream_module

    checks = []
    real_patch = stream_module.apply_patch
    monkeypatch.setattr(stream_module, "apply_patch", lambda *a, **kw: checks.append(1) or real_patch(*a, **kw))

    def run(pace: bool) -> tuple[list[str], list]:
        s = Stream(tiny, bank)
        s.pace_prompts = pace
        s.submit({"type": "transport", "command": "play"}, CAUSE)
        s.apply_due()
        s.generate(1)
        gen, encoded = s.generator, []
        real = gen.decoder.encode_text

        def slow(texts, **kw):
            clock.sleep(0.04)
            encoded.append(texts[0])
            return real(texts, **kw)

        gen.decoder.encode_text = slow
        applied = []
        for i in range(40):
            s.submit({"type": "set", "prompt": f"prompt {i}"}, CAUSE)
            if i % 5 == 2:
                s.submit({"type": "set", "gate": {"p": 0.5 + i / 100}}, CAUSE)  # held with the prompt before it
            applied += s.generate(1).applied
        while s.pending:
            applied += s.generate(1).applied
        assert s.generator.prompt == s.state.prompt == "prompt 39"
        return encoded, applied

    encoded, applied = run(pace=True)
    assert len(checks) <= 2 * 48, len(checks)  # once when sent, once more when it applied later: not every step held
    assert [a.state.prompt for a in applied if a.state.prompt != applied[0].state.prompt][-1] == "prompt 39"
    assert [a.version for a in applied] == sorted(a.version for a in applied)  # in the order they came
    assert len(applied) == 48 and [a.step for a in applied] == sorted(a.step for a in applied)
    gates = [a.state.steering.gate_p for a in applied if a.cause == CAUSE]
    assert sorted(set(gates), key=gates.index) == [1.0] + [0.5 + i / 100 for i in range(2, 40, 5)]
    wait_steps = 0.04 / PROMPT_ENCODE_SHARE * tiny.frame_rate  # 8 steps after a 40 ms encoding (at least)
    assert 2 <= len(encoded) <= 40 / wait_steps + 2, encoded
    assert len({a.step for a in applied}) <= len(encoded) + 1  # the held changes applied together
    offline, applied = run(pace=False)
    assert len(offline) == 40 and [a.step for a in applied][::6] == list(range(1, 41, 5))


def test_the_history_stays_bounded_and_a_recording_started_after_10000_changes_replays(tiny, test_bank_path,
                                                                                          tmp_path):
    """The history a recording started mid-stream replays from: 10,000 changes over 100 steps keep one entry a
    step, compressed; the recording's replay still gives the recorded tokens."""
    from musicrfm.engine.generation import load_banks
    from musicrfm.server.recording import Recorder, replay

    s = Stream(tiny, load_banks([test_bank_path]))
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    for step in range(100):
        for i in range(100):  # the last change of a step is the one that counts
            s.submit({"type": "set", "directions": {"notes:C": {"coefficient": float((step * 7 + i) % 13)}},
                      "gate": {"p": ((step + i) % 10) / 10}}, CAUSE)
        s.generate(1)
    assert s.version == 1 + 10_000 and s.step == 100
    assert len(s.history) <= 101 and s.history.nbytes < 20_000, (len(s.history), s.history.nbytes)

    recorder = Recorder(tmp_path / "mid", s, [test_bank_path])
    for _ in range(10):
        chunk = s.generate(5)
        for applied in chunk.applied:
            recorder.add_state(applied)
        recorder.add_audio(chunk.first_sample, chunk.audio)
    done = recorder.finish(s.generator.codes())
    assert done["frames"][1] > done["frames"][0] > 90
    again = replay(done["log"], model=tiny, progress=False)
    assert again.matches, (again.tokens_sha256, again.expected_sha256)


def test_recordings_say_their_units_and_norms_and_version_1_logs_replay_in_raw_units(tiny, test_bank_path, tmp_path):
    """A log's header keeps the layer norms relative strength was measured against (a bank without its own gets
    the same ones on replay) and each state its units; a log from before units (version 1) was raw units with
    exact min-max weighting, and replays as such."""
    import json

    from musicrfm.engine.generation import load_banks
    from musicrfm.server.recording import Recorder, replay

    bare = tmp_path / "bare.safetensors"  # the test bank without its layer norms: the stream measures them
    bank = load_banks([test_bank_path])
    DirectionBank(bank.directions, bank.fingerprint, bank.method, bank.pooling).save(bare)

    def record(name: str, patch: dict) -> dict:
        s = Stream(tiny, load_banks([bare]))
        s.submit({"type": "set", **patch}, CAUSE)
        s.submit({"type": "transport", "command": "play"}, CAUSE)
        s.apply_due()
        recorder = Recorder(tmp_path / name, s, [bare])
        for _ in range(6):
            chunk = s.generate(5)
            recorder.add_audio(chunk.first_sample, chunk.audio)
        return recorder.finish(s.generator.codes())

    relative = record("relative", {"directions": {"notes:C": {"coefficient": 1.5}}})
    lines = [json.loads(line) for line in open(relative["log"])]
    assert lines[0]["version"] == 2 and lines[0]["layer_norms"]["source"].startswith("measured: ")
    assert lines[1]["state"]["units"] == "relative"
    assert replay(relative["log"], model=tiny, progress=False).matches

    raw = record("raw", {"units": "raw", "layers": "exponential:margin=0", "directions": {"notes:C": {"coefficient": 90}}})
    lines = [json.loads(line) for line in open(raw["log"])]
    lines[0]["version"] = 1
    for line in lines[1:]:
        if line["type"] == "state":
            del line["state"]["units"]
            del line["state"]["layers"]["margin"]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(line) + "\n" for line in lines))
    again = replay(old, model=tiny, progress=False)
    assert again.matches and again.tokens_sha256 == raw["tokens_sha256"]


def test_recordings_say_how_their_audio_was_decoded_and_replay_decodes_the_same_way(tiny, test_bank_path, tmp_path):
    """New logs say `decoding: exact`; a log without the key comes from before the exact EnCodec decoder and is
    compared against windowed audio. A codec whose LSTM keeps a long memory (forget gate held open) makes the two
    decodings differ beyond the replay's tolerance, so the test sees which one replay used."""
    import copy
    import json

    from musicrfm.engine.audio import ExactLayout
    from musicrfm.engine.generation import load_banks
    from musicrfm.server.recording import Recorder, replay

    model = copy.deepcopy(tiny)
    lstm = ExactLayout.of(model.hf.audio_encoder).lstm
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith("bias_ih"):
                bias[lstm.hidden_size : 2 * lstm.hidden_size] = 8.0

    def record(name: str, decoding: str) -> Path:
        s = Stream(model, load_banks([test_bank_path]), decoding=decoding)
        s.submit({"type": "transport", "command": "play"}, CAUSE)
        s.apply_due()
        recorder = Recorder(tmp_path / name, s, [test_bank_path])
        for _ in range(12):
            chunk = s.generate(5)
            recorder.add_audio(chunk.first_sample, chunk.audio)
        recorder.finish(s.generator.codes())
        return recorder.log_path

    def rewrite(log: Path, decoding: str | None) -> Path:
        lines = [json.loads(line) for line in open(log)]
        assert lines[0]["decoding"] in ("exact", "windowed")
        lines[0].pop("decoding")
        if decoding is not None:
            lines[0]["decoding"] = decoding
        out = log.with_name(f"{log.stem}-{decoding}.jsonl")
        out.write_text("".join(json.dumps(line) + "\n" for line in lines))
        out.with_suffix(".wav").write_bytes(log.with_suffix(".wav").read_bytes())
        return out

    exact = record("exact", "auto")
    assert json.loads(open(exact).readline())["decoding"] == "exact"
    assert not replay(exact, model=model, progress=False).problems
    old = record("old", "windowed")  # as streams decoded before the exact decoder
    # No key: windowed. Windowed audio depends on how the frames were pushed (its LSTM restarts from each window's
    # left context), so it reproduces at the recording's chunking; exact audio at any chunking.
    assert not replay(rewrite(old, None), model=model, progress=False, chunk_steps=5).problems
    assert not replay(exact, model=model, progress=False, chunk_steps=7).problems
    mislabelled = replay(rewrite(old, "exact"), model=model, progress=False, chunk_steps=5)
    assert mislabelled.matches and any("recorded WAV differs" in p for p in mislabelled.problems)
    bad = rewrite(old, "mp3")
    with pytest.raises(ValueError, match="decoding must be one of exact, windowed"):
        replay(bad, model=model, progress=False)
