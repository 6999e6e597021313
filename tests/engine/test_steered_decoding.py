"""Steering inside the real decode loop on tiny-random: the exact vector, at the right layers, rows and
steps; nothing anywhere else."""

import pytest
import torch

from musicrfm.engine import steering as engine_steering
from musicrfm.engine.bank import DirectionBank, UnknownDirectionError
from musicrfm.engine.loop import Generator
from musicrfm.engine.model import ModelFingerprint
from musicrfm.engine.steering import (DirectionControl, LayerWeighting, Schedule, SteeringPlan, SteeringSpec,
                             gate_open)


@pytest.fixture(scope="module")
def bank(tiny):
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(3, tiny.num_layers, tiny.hidden_size, generator=g)
    scores = torch.tensor([[0.5, 0.9, 0.7, 0.6]] * 3)  # layer 1 best, layer 0 worst
    return DirectionBank.from_arrays("notes", ["C", "D", "E"], vecs, scores, tiny.fingerprint,
                                     method="test", pooling="mean")


def _plan(tiny, bank, **spec):
    spec.setdefault("units", "raw")  # the exact vectors in hidden-state units (relative units: test_steering)
    return SteeringPlan.compile(SteeringSpec(**spec), bank, tiny.fingerprint, device=tiny.device, dtype=tiny.dtype)


class Recorder:
    """Spies on engine.steering.BatchSteering.steer, the update every decode step makes, and keeps what it did
    to one generator's rows (and how far it moved any other row of the batch: padding, never steered)."""

    def __init__(self, monkeypatch, gen):
        self.calls = []
        real = engine_steering.BatchSteering.steer

        def spy(this, site, layer, h):
            out = real(this, site, layer, h)
            if out is not h:
                rows = gen.rows
                self.calls.append(dict(step=gen.step, site=site, layer=layer, h=h[rows].clone(), out=out[rows].clone(),
                                       others=float((out - h)[rows.stop:].abs().max())))
            return out

        monkeypatch.setattr(engine_steering.BatchSteering, "steer", spy)


def test_exact_vectors_at_each_layer_and_both_rows(tiny, bank, monkeypatch):
    plan = _plan(tiny, bank, controls=(DirectionControl("notes:C", 0.7), DirectionControl("notes:E", -0.2)),
                 layers=LayerWeighting(mode="topk", k=2))
    gen = Generator(tiny, "piano", plan=plan, seed=0)
    rec = Recorder(monkeypatch, gen)
    gen.run(3)
    # One update per layer per step: the decoder never skips or repeats a layer.
    assert [c["layer"] for c in rec.calls] == list(range(tiny.num_layers)) * 3
    assert gen.decoder.rows > 2  # the batch holds padding rows besides the stream's two ...
    top2 = {1, 2}
    for call in rec.calls:
        expected = torch.zeros(tiny.hidden_size)
        if call["layer"] in top2:
            expected = 0.7 * bank["notes:C"].vectors[call["layer"]] - 0.2 * bank["notes:E"].vectors[call["layer"]]
        assert call["h"].shape[0] == 2  # both guidance rows went through the update
        torch.testing.assert_close(call["out"], call["h"] + expected)
        assert call["others"] == 0.0  # ... which are never steered


def test_conditional_row_only(tiny, bank):
    """A refill's forward (several positions for one stream's rows) spares the unconditional row."""
    plan = _plan(tiny, bank, controls=(DirectionControl("notes:D", 1.0),), rows="cond",
                 layers=LayerWeighting(mode="all"))
    steered, plain = Generator(tiny, "piano", plan=plan), Generator(tiny, "piano")
    seen = {"steered": {}, "plain": {}}
    tokens = steered._inputs(0, 0)
    steered.decoder.forward(tokens, plan.at([0]), rows=steered.rows, cond_rows=1,
                            capture=lambda i, h: seen["steered"].__setitem__(i, h.clone()))
    plain.decoder.forward(tokens, None, rows=plain.rows, cond_rows=1,
                          capture=lambda i, h: seen["plain"].__setitem__(i, h.clone()))
    s, p = seen["steered"], seen["plain"]
    # Row 0 (conditional) moved by exactly the direction at layer 0; row 1 (unconditional) untouched
    # at every layer.
    torch.testing.assert_close(s[0][0] - p[0][0], bank["notes:D"].vectors[0][None])
    for layer in range(tiny.num_layers):
        torch.testing.assert_close(s[layer][1], p[layer][1])
    assert not torch.allclose(s[3][0], p[3][0])


def test_gate_fires_on_the_right_steps_and_schedule_clock_keeps_running(tiny, bank, monkeypatch):
    sched = Schedule("linear_rise", length=40)
    plan = _plan(tiny, bank, controls=(DirectionControl("notes:C", 0.5, sched),), gate_p=0.3, gate_seed=11,
                 layers=LayerWeighting(mode="all"))
    gen = Generator(tiny, "piano", plan=plan)
    rec = Recorder(monkeypatch, gen)
    gen.run(60)
    fired = sorted({c["step"] for c in rec.calls})
    expected = [s for s in range(60) if gate_open(11, s, 0.3) and sched(s) > 0]
    assert fired == expected and 8 <= len(fired) <= 30
    for call in rec.calls:  # strength follows the step's schedule value, not a count of gated-in steps
        layer_vec = bank["notes:C"].vectors[call["layer"]]
        scale = (call["out"] - call["h"])[0].norm() / layer_vec.norm()
        assert scale.item() == pytest.approx(0.5 * sched(call["step"]), rel=1e-4)


def test_attention_site_and_norm_rule(tiny, monkeypatch):
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(1, tiny.num_layers, tiny.hidden_size, generator=g)
    attn_bank = DirectionBank.from_arrays("timbre", ["flute"], vecs, torch.ones(1, tiny.num_layers),
                                          tiny.fingerprint, method="linear", pooling="mean",
                                          injection_point="attention")
    plan = _plan(tiny, attn_bank, controls=(DirectionControl("timbre:flute", 0.4),), site="attention",
                 rule="norm", layers=LayerWeighting(mode="all"), rows="cond")
    gen = Generator(tiny, "piano", plan=plan)
    rec = Recorder(monkeypatch, gen)
    gen.run(2)
    assert len(rec.calls) == 2 * tiny.num_layers and all(c["site"] == "attention" for c in rec.calls)
    for call in rec.calls:
        h, out = call["h"], call["out"]
        v = plan.at([call["step"]]).layers()[call["layer"]]
        expected = (h[0] + h[0].norm() * v) / (1 + v.norm())
        torch.testing.assert_close(out[0], expected)  # the conditional row, by the norm-preserving rule
        assert torch.equal(out[1], h[1])  # the unconditional row untouched
    # With a bank read at the residual stream, an attention-site plan is refused.
    with pytest.raises(ValueError, match="injection point"):
        _plan(tiny, DirectionBank.from_arrays("x", ["y"], vecs, torch.ones(1, tiny.num_layers), tiny.fingerprint,
                                              method="m", pooling="mean"),
              controls=(DirectionControl("x:y", 0.4),), site="attention")


def test_steering_changes_tokens_and_zero_coefficient_does_not(tiny, bank):
    base = Generator(tiny, "piano", seed=4, total_frames=30)
    base.run(1000)
    zero = Generator(tiny, "piano", seed=4, total_frames=30,
                     plan=_plan(tiny, bank, controls=(DirectionControl("notes:C", 0.0),)))
    zero.run(1000)
    strong = Generator(tiny, "piano", seed=4, total_frames=30,
                       plan=_plan(tiny, bank, controls=(DirectionControl("notes:C", 8.0),),
                                  layers=LayerWeighting(mode="all")))
    strong.run(1000)
    assert torch.equal(base.codes(), zero.codes())
    assert not torch.equal(base.codes(), strong.codes())


def test_bad_controls_are_rejected_with_clear_errors(tiny, bank):
    with pytest.raises(ValueError, match="notes:C.*coefficient.*finite"):
        DirectionControl("notes:C", float("nan"))
    with pytest.raises(ValueError, match="finite"):
        DirectionControl("notes:C", float("inf"))
    with pytest.raises(UnknownDirectionError, match="notes:C"):
        _plan(tiny, bank, controls=(DirectionControl("notes:Q", 0.3),))
    other = ModelFingerprint("musicgen", 48, 2048)
    with pytest.raises(Exception, match="48 layers x hidden size 2048"):
        SteeringPlan.compile(SteeringSpec(controls=(DirectionControl("notes:C", 0.3),)),
                             DirectionBank.from_arrays("notes", ["C"], torch.randn(1, 48, 2048),
                                                       torch.ones(1, 48), other, method="m", pooling="mean"),
                             tiny.fingerprint)
