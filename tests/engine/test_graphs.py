"""The CUDA-graph path (engine.graphs) on what a CPU can check: the captured step's steering over static buffers
computes what the eager step computes, and without a CUDA device an engine asked for graphs steps eagerly, says
why, and gives the same tokens. (Capturing and replaying need a GPU: bench/bench_gpu.py, docs/BENCHMARKS.md.)"""

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


def test_without_cuda_an_engine_asked_for_graphs_steps_eagerly_and_says_why(tiny, plans, caplog):
    with caplog.at_level(logging.WARNING, logger="musicrfm.loop"):
        engine = Engine(tiny, context_steps=32, cuda_graphs=True)
    assert isinstance(engine.captured, CapturedSteps) and "CUDA device" in engine.captured.reason
    assert any("CUDA graphs need a CUDA device" in r.getMessage() for r in caplog.records)
    graphed = Generator(tiny, "piano", seed=5, plan=plans[1], engine=engine)
    plain = Generator(tiny, "piano", seed=5, plan=plans[1], context_steps=32)
    graphed.run(40)
    plain.run(40)
    assert torch.equal(graphed.codes(), plain.codes()) and engine.captured.replays == 0
