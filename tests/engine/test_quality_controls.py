"""Quality controls (`quality:<q>`, engine.steering.QUALITY_TONES): the chord tones of a quality written with the
notes bank on the root read from the hidden state, at every layer and position; the same through a single
step, a refill, a batch with company, a captured engine and a live stream."""

from __future__ import annotations

import pytest
import torch

from musicrfm.engine.bank import DirectionBank, LayerNorms, UnknownDirectionError
from musicrfm.engine.loop import Engine, Generator
from musicrfm.engine.model import ModelFingerprint
from musicrfm.engine.norms import with_layer_norms
from musicrfm.engine.steering import (PITCH_CLASSES, QUALITY_TONES, DirectionControl, LayerWeighting, Schedule,
                                      SteeringPlan, SteeringSpec, check_control_key, steerable_keys)
from musicrfm.server.offline import play_messages
from musicrfm.server.stream import Cause, Stream

L, D = 3, 16
FP = ModelFingerprint("musicgen", L, D)
ALL = LayerWeighting("all")


def basis_bank(fp: ModelFingerprint = FP) -> DirectionBank:
    """notes:C ... notes:B along the first 12 axes at every layer: what is read and written can be named."""
    vecs = torch.zeros(12, fp.num_layers, fp.hidden_size)
    for p in range(12):
        vecs[p, :, p] = 1.0
    return DirectionBank.from_arrays("notes", list(PITCH_CLASSES), vecs, torch.rand(12, fp.num_layers), fp,
                                     method="test", pooling="mean")


def axis(p: int) -> torch.Tensor:
    out = torch.zeros(D)
    out[p % 12] = 1.0
    return out


def plan_of(*controls: DirectionControl, bank: DirectionBank | None = None, **spec) -> SteeringPlan:
    spec.setdefault("layers", ALL)
    return SteeringPlan.compile(SteeringSpec(controls=controls, units="raw", **spec), bank or basis_bank(), FP)


@pytest.mark.parametrize("quality", list(QUALITY_TONES))
def test_a_quality_writes_its_tones_on_the_root_it_reads_at_every_root(quality):
    toward, away = QUALITY_TONES[quality]
    step = plan_of(DirectionControl(f"quality:{quality}", 0.5)).at([0])
    assert step.reads_state
    for root in range(12):
        h = 3.0 * axis(root) + 0.2 * axis(root + 5)  # reads as `root`: the largest projection
        h = h.expand(2, 1, D).clone()  # two rows (guidance), one position
        expected = 0.5 * (sum(axis(root + i) for i in toward) - sum(axis(root + i) for i in away))
        for layer in range(L):
            out = step.steer(layer, h)
            torch.testing.assert_close(out - h, expected.expand(2, 1, D))


def test_the_root_is_read_after_the_plain_vectors_and_per_position():
    """A notes control that moves the root moves what the quality writes (the root knob and the quality knob
    compose); in a refill each position reads its own root and takes its own step's coefficient."""
    step = plan_of(DirectionControl("notes:D", 5.0), DirectionControl("quality:minor", 1.0)).at([0])
    h = axis(0).view(1, 1, D)  # reads C alone, but notes:D lands first
    torch.testing.assert_close(step.steer(0, h), (h + 5.0 * axis(2) + 2 * axis(2) + axis(5) + axis(9) - axis(6)).view(1, 1, D))
    rise = plan_of(DirectionControl("quality:major", 1.0, Schedule("linear_rise", length=100)))
    refill = rise.at([25, 50, 100])
    h = torch.stack([axis(0), axis(7), axis(9)]).unsqueeze(0)  # [1 row, 3 positions, D]: roots C, G, A
    want = torch.stack([c * (2 * axis(r) + axis(r + 4) + axis(r + 7) - axis(r + 3)) for c, r in ((0.25, 0), (0.5, 7), (1.0, 9))])
    torch.testing.assert_close(refill.steer(1, h) - h, want.unsqueeze(0))


def test_quality_strength_follows_each_notes_layer_weighting_and_units():
    norms = LayerNorms((2.0, 3.0, 5.0), (0.1, 0.1, 0.1), 10, "test")
    scores = torch.tensor([[0.2, 0.9, 0.5]] * 12)
    vectors = torch.stack([basis_bank()[f"notes:{p}"].vectors for p in PITCH_CLASSES])
    bank = DirectionBank.from_arrays("notes", list(PITCH_CLASSES), vectors, scores, FP, method="test",
                                     pooling="mean", layer_norms=norms)
    spec = SteeringSpec(controls=(DirectionControl("quality:major", 0.4),), layers=LayerWeighting("topk", k=1))
    step = SteeringPlan.compile(spec, bank, FP).at([0])
    h = axis(4).view(1, 1, D)  # E major: E twice, G#, B up, G down
    for layer in range(L):
        scale = 3.0 if layer == 1 else 0.0  # top-1 layer, relative units: 0.4 of that layer's typical norm
        torch.testing.assert_close(step.steer(layer, h) - h,
                                   (0.4 * scale * (2 * axis(4) + axis(8) + axis(11) - axis(7))).view(1, 1, D))
    norms_of = SteeringPlan.compile(spec, bank, FP).vector_norms()["quality:major"]
    assert norms_of == pytest.approx([0.0, 0.4 * 3.0 * 7 ** 0.5, 0.0], abs=1e-4)


def test_keys_and_what_a_quality_control_needs():
    from musicrfm.probes.syntheory import PITCH_NAMES

    assert PITCH_CLASSES == tuple(PITCH_NAMES)  # the engine's names for the notes bank's classes: the data's own
    bank = basis_bank()
    assert steerable_keys(bank) == [f"notes:{p}" for p in PITCH_CLASSES] + [f"quality:{q}" for q in QUALITY_TONES]
    few = DirectionBank.from_arrays("notes", ["C", "D"], torch.eye(D)[:2, None].expand(2, L, D).contiguous(),
                                    torch.rand(2, L), FP, method="test", pooling="mean")
    assert steerable_keys(few) == ["notes:C", "notes:D"] and steerable_keys(None) == []
    with pytest.raises(ValueError, match="unknown chord quality 'sus4'.*quality:major"):
        check_control_key(bank, "quality:sus4")
    with pytest.raises(ValueError, match="notes directions .* add the notes bank"):
        SteeringPlan.compile(SteeringSpec(controls=(DirectionControl("quality:minor", 1.0),), units="raw"), few, FP)
    with pytest.raises(UnknownDirectionError):
        check_control_key(bank, "chords:major")
    with pytest.raises(ValueError, match="add rule"):
        plan_of(DirectionControl("quality:minor", 1.0), rule="norm")
    assert plan_of(DirectionControl("quality:minor", 0.0)).at([0]) is None  # nothing on: nothing to do
    # a bank with a trained concept of that name keeps its own keys: no control is shadowed
    own = bank.merge(DirectionBank.from_arrays("quality", ["bright"], torch.eye(D)[None, :1].expand(1, L, D).contiguous(),
                                               torch.rand(1, L), FP, method="test", pooling="mean"))
    assert "quality:bright" in steerable_keys(own) and "quality:major" not in steerable_keys(own)
    with pytest.raises(UnknownDirectionError):
        check_control_key(own, "quality:major")


# --- inside the decode loop (tiny-random) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_notes(tiny):
    g = torch.Generator().manual_seed(5)
    fp = tiny.fingerprint
    bank = DirectionBank.from_arrays("notes", list(PITCH_CLASSES), torch.randn(12, fp.num_layers, fp.hidden_size,
                                                                               generator=g),
                                     torch.rand(12, fp.num_layers, generator=g), fp, method="test", pooling="mean")
    return with_layer_norms(bank, tiny)


def _plan(tiny, bank, *controls):
    return SteeringPlan.compile(SteeringSpec(controls=controls, layers=ALL), bank, tiny.fingerprint)


def test_a_quality_row_steps_alike_alone_in_company_and_captured(tiny, tiny_notes):
    """The quality control changes the tokens; a stream gets the same tokens alone, batched beside a plainly
    steered stream, and on a capturing engine (whose captured step cannot read the state: it steps eagerly)."""
    quality = _plan(tiny, tiny_notes, DirectionControl("notes:E", 1.0), DirectionControl("quality:minor", 2.0))
    plain = _plan(tiny, tiny_notes, DirectionControl("notes:E", 1.0))

    def run(engine, plans):
        gens = [Generator(tiny, "piano chord", seed=7, plan=p, engine=engine) for p in plans]
        for _ in range(30):
            engine.step(gens)
        return [g.codes() for g in gens]

    alone = run(Engine(tiny), [quality])[0]
    assert not torch.equal(alone, run(Engine(tiny), [plain])[0])
    company = run(Engine(tiny, slots=2), [plain, quality])
    assert torch.equal(company[1], alone)
    captured = Engine(tiny, slots=2, capture=True)
    got = run(captured, [plain, quality])
    assert torch.equal(got[1], alone) and torch.equal(got[0], company[0])
    assert captured.captured.reason is None  # nothing failed: the steps that read the state ran eagerly


def test_a_live_stream_takes_a_quality_knob_from_the_protocol(tiny, tiny_notes):
    """`quality:minor` is a key like any other for a client: listed, set at an exact step, replayed offline."""
    s = Stream(tiny, tiny_notes)
    assert "quality:minor" in s.known_keys and "notes:C" in s.known_keys
    messages = [{"type": "set", "directions": {"notes:A": {"coefficient": 1.0},
                                               "quality:minor": {"coefficient": 2.0}}, "at_step": 10}]
    for m in messages + [{"type": "transport", "command": "stop", "at_step": 40},
                         {"type": "transport", "command": "play"}]:
        s.submit(m, Cause("test"))
    s.apply_due()
    while s.state.playback == "playing":
        s.generate(5)
    live = s.finished_codes
    offline = play_messages(tiny, tiny_notes, messages, live.shape[1], progress=False)
    assert torch.equal(offline.codes, live)
    unsteered = play_messages(tiny, tiny_notes, [], live.shape[1], progress=False).codes
    # step s writes codebook 0 of frame s: nothing differs before step 10, the knob changes what follows
    assert torch.equal(live[:, :7], unsteered[:, :7]) and not torch.equal(live[0, 10:], unsteered[0, 10:])
