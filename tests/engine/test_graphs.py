"""The captured step (engine.graphs) on what a CPU can check: the captured step's steering over static buffers
computes what the eager step computes; on a CPU the capture is a TorchScript trace whose tokens are the eager
engine's bit for bit through joins, leaves, prompt changes and re-prompts; a capture that fails, or does not
reproduce the eager step, is dropped and said. (CUDA graphs need a GPU: bench/bench_gpu.py, docs/BENCHMARKS.md.)"""

from __future__ import annotations

import logging

import pytest
import torch

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.graphs import CapturedSteps, StaticSteering
from musicrfm.engine.loop import Engine, Generator
from musicrfm.engine.steering import BatchSteering, DirectionControl, LayerWeighting, SteeringPlan, SteeringSpec


@pytest.fixture(scope="module")
def plans(tiny):
    g = torch.Generator().manual_seed(3)
    bank = DirectionBank.from_arrays("notes", ["C"], torch.randn(1, tiny.num_layers, tiny.hidden_size, generator=g),
                                     torch.rand(1, tiny.num_layers, generator=g), tiny.fingerprint, method="test",
                                     pooling="mean")

    def plan(rule: str) -> SteeringPlan:
        spec = SteeringSpec(controls=(DirectionControl("notes:C", 0.7),), rule=rule, units="raw",
                            layers=LayerWeighting(mode="all"))
        return SteeringPlan.compile(spec, bank, tiny.fingerprint)

    return plan("add"), plan("norm")


def test_static_steering_computes_what_the_eager_step_does(tiny, plans):
    add, norm = plans
    rows = 8
    batch = BatchSteering.stack(rows, [(slice(0, 2), add.at([3])), (slice(4, 5), norm.at([3]))])
    static = StaticSteering("residual", rows, tiny.num_layers, tiny.hidden_size, tiny.device, tiny.dtype)
    assert static.load(batch)
    h = torch.randn(rows, 1, tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in range(tiny.num_layers):
        assert torch.equal(static.steer("residual", layer, h), batch.steer("residual", layer, h))
        assert static.steer("attention", layer, h) is h
    assert static.load(None) and torch.equal(static.steer("residual", 0, h), h + 0)  # nothing steered: h itself
    attention = BatchSteering.stack(rows, [(slice(0, 1), _at_site(add, "attention"))])
    assert not static.load(attention)  # another site: that step runs eagerly


def _at_site(plan: SteeringPlan, site: str):
    step = plan.at([0])
    step.site = site
    return step


def test_the_captured_step_core_is_the_eager_step(tiny, plans):
    """What a graph records (step_core with always-applied static steering) gives the eager step's logits."""
    add, _ = plans
    eager, core = (Engine(tiny, context_steps=32) for _ in range(2))
    gens = [Generator(tiny, "organ", seed=1, plan=add, engine=e) for e in (eager, core)]
    for g in gens:
        g.run(3)
    dec_e, dec_c = eager.decoder, core.decoder
    tokens = gens[0]._inputs(3, 3).expand(dec_e.rows, -1, -1).contiguous()
    stepping = [True, True] + [False] * (dec_e.rows - 2)
    batch = BatchSteering.stack(dec_e.rows, [(gens[0].rows, add.at([3]))])
    static = StaticSteering("residual", dec_c.rows, tiny.num_layers, tiny.hidden_size, tiny.device, tiny.dtype)
    static.load(BatchSteering.stack(dec_c.rows, [(gens[1].rows, add.at([3]))]))
    expected = dec_e.step(tokens, stepping, batch)
    got = dec_c.step_core(tokens, dec_c.write_positions(dec_c.rows, stepping), static)
    dec_c.advance(stepping)
    assert torch.equal(got[:2], expected[:2])
    assert dec_c.lengths == dec_e.lengths


def _play(engine_of, plans) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Streams on one engine through what moves a decoder's state: steering by both rules, a prompt change, a
    join (4 -> 8 rows: the caches are reallocated), a leave (back to 4 rows, a batch size seen before the caches
    moved; the last stream moves into the freed rows), re-prompts past the context."""
    tiny = engine_of.model
    add, norm = plans
    gens = [Generator(tiny, "organ", seed=1, plan=add, engine=engine_of),
            Generator(tiny, "piano", seed=2, plan=norm, engine=engine_of)]
    done = []
    for step in range(90):
        if step == 10:
            gens[0].set_prompt("a distorted guitar solo with drums")
        if step == 20:
            gens.append(Generator(tiny, "strings", seed=3, engine=engine_of))
        if step == 45:
            done.append(gens.pop(1))
            done[-1].close()
        engine_of.step(gens)
    # The decoder's state too: a random tiny model's sampled tokens hardly depend on the context, its caches do.
    # (Not the caches' scratch position past the capacity, which the check at capture writes to.)
    dec = engine_of.decoder
    state = [c[:, :, :dec.capacity] for c in dec.k_cache + dec.v_cache] + dec.state()[2 * len(dec.layers):]
    return [g.codes() for g in done + gens], state


def test_a_traced_engine_gives_the_eager_engines_tokens(tiny, plans):
    """On a CPU the captured step is a TorchScript trace: it reads the decoder's state as inputs, so prompt changes,
    joins, leaves and re-prompts reach it, and its tokens are the eager engine's, bit for bit."""
    traced = Engine(tiny, context_steps=32, capture=True)
    assert isinstance(traced.captured, CapturedSteps) and traced.captured.kind == "trace"
    (got, got_state), (expected, expected_state) = _play(traced, plans), _play(Engine(tiny, context_steps=32), plans)
    assert traced.captured.reason is None and traced.captured.replays > 60  # refills after re-prompts run eagerly
    assert len(got) == len(expected) == 3 and len(got_state) == len(expected_state) == 4 * tiny.num_layers + 1
    for a, b in zip(got + got_state, expected + expected_state):
        assert torch.equal(a, b)


def test_a_capture_that_does_not_reproduce_the_eager_step_is_dropped_and_said(tiny, plans, monkeypatch, caplog):
    """The check at capture: a trace whose numbers differ in the last bit is refused; the engine steps eagerly,
    says why once, and the tokens are the eager ones."""
    from musicrfm.engine import graphs

    real_run = graphs._Trace.run
    monkeypatch.setattr(graphs._Trace, "run", lambda self, *a: real_run(self, *a) * (1 + 1e-7) + 1e-30)
    with caplog.at_level(logging.WARNING, logger="musicrfm.graphs"):
        engine = Engine(tiny, context_steps=32, capture=True)
        got, _ = _play(engine, plans)
    assert "does not reproduce the eager step" in engine.captured.reason and engine.captured.replays == 0
    assert sum("stepping eagerly" in r.getMessage() for r in caplog.records) == 1
    for a, b in zip(got, _play(Engine(tiny, context_steps=32), plans)[0]):
        assert torch.equal(a, b)


def test_a_capture_that_fails_steps_eagerly_and_says_why(tiny, plans, monkeypatch):
    def no_trace(*args, **kwargs):
        raise RuntimeError("tracing is not supported here")

    monkeypatch.setattr(torch.jit, "trace", no_trace)
    engine = Engine(tiny, context_steps=32, capture=True)
    graphed = Generator(tiny, "piano", seed=5, plan=plans[1], engine=engine)
    plain = Generator(tiny, "piano", seed=5, plan=plans[1], context_steps=32)
    graphed.run(40)
    plain.run(40)
    assert "capturing a trace of 4 rows failed (RuntimeError: tracing is not supported here)" in engine.captured.reason
    assert torch.equal(graphed.codes(), plain.codes()) and engine.captured.replays == 0
