"""Many streams stepped together in one batched forward (engine.loop.Engine) give each stream exactly the tokens
it gets stepping alone: with steering of every kind, prompt and steering changes, sampling without guidance,
audio prompts, re-prompting past the context, pauses, and streams joining and leaving mid-way."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import load_model
from musicrfm.engine.loop import MIN_ROWS, Engine, Generator, padded_rows
from musicrfm.engine.sampling import SamplingConfig
from musicrfm.engine.steering import DirectionControl, LayerWeighting, Schedule, SteeringPlan, SteeringSpec

CONTEXT, KEEP = 40, 16  # re-prompts every 24 steps after the first 40


def _plans(tiny):
    g = torch.Generator().manual_seed(5)
    bank = DirectionBank.from_arrays("notes", ["C", "D"], torch.randn(2, tiny.num_layers, tiny.hidden_size, generator=g),
                                     torch.rand(2, tiny.num_layers, generator=g), tiny.fingerprint, method="test",
                                     pooling="mean")

    def plan(**spec):
        spec.setdefault("units", "raw")
        return SteeringPlan.compile(SteeringSpec(**spec), bank, tiny.fingerprint)

    return {
        "C": plan(controls=(DirectionControl("notes:C", 1.5),), layers=LayerWeighting(mode="all")),
        "D-cond-norm": plan(controls=(DirectionControl("notes:D", 0.8, Schedule("sine", period=30)),), rows="cond",
                            rule="norm", layers=LayerWeighting(mode="topk", k=2)),
        "gated": plan(controls=(DirectionControl("notes:C", -1.0), DirectionControl("notes:D", 0.6)), gate_p=0.5,
                      gate_seed=3),
    }


@dataclass
class Script:
    """One stream: how it is made, when it joins and leaves the batch (engine ticks), the ticks it sits out
    (paused), and what changes at its own steps."""

    prompt: str
    seed: int
    sampling: SamplingConfig = SamplingConfig(top_k=30)
    plan: str | None = None
    join: int = 0
    leave: int | None = None
    paused: range = range(0)
    audio_prompt: torch.Tensor | None = None
    at_step: dict[int, dict] = field(default_factory=dict)  # step -> {"prompt": ..., "plan": ...}


def _make(tiny, script: Script, plans, engine: Engine | None) -> Generator:
    return Generator(tiny, script.prompt, seed=script.seed, sampling=script.sampling,
                     plan=plans[script.plan] if script.plan else None, context_steps=CONTEXT, keep_steps=KEEP,
                     audio_prompt=script.audio_prompt, engine=engine)


def _changes(gen: Generator, script: Script, plans) -> None:
    change = script.at_step.get(gen.step, {})
    if "prompt" in change:
        gen.set_prompt(change["prompt"])
    if "plan" in change:
        gen.plan = plans[change["plan"]] if change["plan"] else None


def _run_together(tiny, scripts: list[Script], plans, ticks: int) -> list[torch.Tensor]:
    engine = Engine(tiny, context_steps=CONTEXT)
    gens: dict[int, Generator] = {}
    codes: dict[int, torch.Tensor] = {}
    for tick in range(ticks):
        for i, s in enumerate(scripts):
            if tick == s.join:
                gens[i] = _make(tiny, s, plans, engine)
            if tick == s.leave:  # it leaves: its slot goes back to the engine, the others move up
                codes[i] = gens[i].codes()
                gens.pop(i).close()
        stepping = [(i, g) for i, g in gens.items() if tick not in scripts[i].paused]
        for i, g in stepping:
            _changes(g, scripts[i], plans)
        if stepping:
            engine.step([g for _, g in stepping])
    for i, g in gens.items():
        codes[i] = g.codes()
    return [codes[i] for i in range(len(scripts))]


def _run_alone(tiny, script: Script, plans, steps: int) -> torch.Tensor:
    gen = _make(tiny, script, plans, None)
    for _ in range(steps):
        _changes(gen, script, plans)
        gen.advance()
    return gen.codes()


def _steps_taken(script: Script, ticks: int) -> int:
    end = script.leave if script.leave is not None else ticks
    return sum(1 for t in range(script.join, end) if t not in script.paused)


@pytest.mark.parametrize("model", ["tiny", "mini"])
def test_batched_streams_get_the_tokens_they_get_alone(model, request):
    tiny = request.getfixturevalue(model)
    plans = _plans(tiny)
    prompt_codes = torch.randint(0, 64, (tiny.num_codebooks, 9), generator=torch.Generator().manual_seed(2))
    scripts = [
        Script("warm piano", 0, plan="C", at_step={30: {"prompt": "fast drums"}, 70: {"plan": "gated"}}),
        Script("", 1, sampling=SamplingConfig(guidance_scale=1.0, top_p=0.9), plan="D-cond-norm", join=5,
               leave=90),
        Script("a long prompt about a string quartet playing softly in a large hall", 2, join=12,
               paused=range(40, 55), at_step={20: {"plan": "C"}, 50: {"plan": None}}),
        Script("bass", 3, sampling=SamplingConfig(greedy=True), audio_prompt=prompt_codes, join=33, plan="gated"),
        Script("organ", 4, join=60, leave=100, at_step={10: {"prompt": "choir"}}),
    ]
    ticks = 130
    together = _run_together(tiny, scripts, plans, ticks)
    for i, script in enumerate(scripts):
        steps = _steps_taken(script, ticks)
        alone = _run_alone(tiny, script, plans, steps)
        assert steps > CONTEXT or script.leave is not None  # most streams re-prompt at least once
        assert together[i].shape == alone.shape, i
        assert torch.equal(together[i], alone), f"stream {i} differs from its solo run"


@pytest.fixture(scope="module")
def mini():
    """The bundled model: real layer sizes, where the CPU's matrix products round by batch size (tiny-random's
    are too small to)."""
    return load_model("musicgen-mini")


def test_the_batch_changes_nothing_a_stream_computes(mini):
    """One step's logits for a stream: the same bits with 0, 1 or 6 other streams in the batch, in any slot.
    (Without the padding to MIN_ROWS, alone differs from in company at ~6e-6 on the 2-core development box.)"""
    def logits(others: int, position: int) -> torch.Tensor:
        engine = Engine(mini)
        gens = [Generator(mini, f"other {i}", seed=i, engine=engine) for i in range(others)]
        mine = Generator(mini, "the stream", seed=9, engine=engine)
        order = [*gens[:position], mine, *gens[position:]]
        seen = {}
        for _ in range(3):
            engine.step(order)
        step = engine.decoder.step

        def spy(tokens, stepping, steering=None):
            out = step(tokens, stepping, steering)
            seen["logits"] = out[mine.rows].clone()
            return out

        engine.decoder.step = spy
        engine.step(order)
        return seen["logits"]

    ref = logits(0, 0)
    assert torch.equal(ref, logits(1, 1))
    assert torch.equal(ref, logits(1, 0))
    assert torch.equal(ref, logits(6, 3))



def test_slots_stay_packed_as_streams_leave(tiny):
    engine = Engine(tiny, context_steps=CONTEXT)
    gens = [Generator(tiny, "x", seed=i, engine=engine) for i in range(5)]
    assert [g.slot for g in gens] == [0, 1, 2, 3, 4]
    assert engine.decoder.rows == padded_rows(10) == 16
    gens[1].close()
    assert gens[1].slot is None and [g.slot for g in engine.streams] == [0, 1, 2, 3]
    assert gens[4].slot == 1  # the last one took the free slot
    with pytest.raises(ValueError, match="attached"):
        engine.step([gens[1]])
    assert padded_rows(1) == MIN_ROWS and padded_rows(5) == 8


def test_an_engine_refuses_what_it_cannot_hold(tiny):
    plain = Engine(tiny, context_steps=CONTEXT, guidance=False)
    with pytest.raises(ValueError, match="guidance"):
        Generator(tiny, "x", engine=plain)
    with pytest.raises(ValueError, match="context_steps"):
        Generator(tiny, "x", context_steps=CONTEXT + 1, engine=Engine(tiny, context_steps=CONTEXT))
    engine = Engine(tiny, context_steps=CONTEXT)
    with pytest.raises(TypeError):
        Generator(tiny, 5, engine=engine)
    assert engine.streams == []  # a generator that failed to start gave its slot back


def test_clips_made_together_regenerate_alone_from_their_sidecars(tiny, test_bank_path):
    """generate_many (sweeps) makes each clip as it would be made alone on a padded engine; its sidecar records
    min_rows, so `generate --from-sidecar` makes it again exactly."""
    from musicrfm.engine.generation import Render, generate_from_sidecar, generate_many

    spec = SteeringSpec(controls=(DirectionControl("notes:C", 0.5),), gate_p=0.5, gate_seed=7)
    renders = [Render("piano", 1, spec, (str(test_bank_path),)), Render("drums", 2), Render("", 3, spec,
                                                                                        (str(test_bank_path),))]
    clips = generate_many(tiny, renders, 1.0, progress=False)
    assert [c.settings["min_rows"] for c in clips] == [MIN_ROWS] * 3
    for clip in clips:
        again = generate_from_sidecar(clip.settings, model=tiny, progress=False)
        assert torch.equal(again.codes, clip.codes) and again.settings["tokens_sha256"] == clip.settings["tokens_sha256"]
        # The audio too (EnCodec decoded alone instead of in a batch: round-off only).
        assert torch.allclose(torch.from_numpy(again.audio), torch.from_numpy(clip.audio), atol=1e-5)
