"""Steering: schedules, layer weighting, the gate, specs, the compiled plan and the update rules."""

import json
import math

import pytest
import torch

from musicrfm.engine import bank as bank_module
from musicrfm.engine import decoder
from musicrfm.engine import steering as steering_module
from musicrfm.engine.bank import BankMismatchError, DirectionBank, LayerNorms, UnknownDirectionError
from musicrfm.engine.model import ModelFingerprint
from musicrfm.engine.steering import (
    DirectionControl,
    LayerWeighting,
    Schedule,
    SteeringPlan,
    SteeringSpec,
    apply_steering,
    crossfade,
    gate_open,
)

L, D = 4, 8
FP = ModelFingerprint("musicgen", L, D)


@pytest.fixture
def bank() -> DirectionBank:
    g = torch.Generator().manual_seed(0)
    return DirectionBank.from_arrays("notes", ["C", "D", "E"], torch.randn(3, L, D, generator=g),
                                     torch.rand(3, L, generator=g), FP, "rfm", "mean", layer_norms=NORMS)


NORMS = LayerNorms((2.0, 3.0, 5.0, 7.0), (0.1, 0.2, 0.3, 0.4), 100, "test")


def open_steps(seed, p, n=2000):
    return [t for t in range(n) if gate_open(seed, t, p)]


# --- schedules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,step,expected", [
    (Schedule(), 123, 1.0),
    (Schedule("linear_rise"), 0, 0.0),
    (Schedule("linear_rise"), 750, 0.5),
    (Schedule("linear_rise"), 3000, 1.0),
    (Schedule("linear_rise", start=100, length=200), 150, 0.25),
    (Schedule("linear_decay"), 300, 0.8),
    (Schedule("linear_decay"), 1500, 0.0),
    (Schedule("exp_decay"), 0, 1.0),
    (Schedule("exp_decay"), 500, 0.998**500),
    (Schedule("exp_decay", lam=0.9, start=10), 5, 1.0),
    (Schedule("exp_decay", lam=0.9, start=10), 13, 0.9**3),
    (Schedule("logistic"), 750, 0.5),
    (Schedule("logistic"), 950, 1 / (1 + math.exp(-1))),
    (Schedule("logistic"), 0, 1 / (1 + math.exp(750 / 200))),
    (Schedule("logistic", center=0, width=0.001), 10**6, 1.0),  # far from the centre: no overflow
    (Schedule("sine"), 0, 0.5),
    (Schedule("sine"), 375, 1.0),
    (Schedule("sine"), 1125, 0.0),
    (Schedule("sine", period=100, phase=math.pi / 2), 50, 0.0),
    (Schedule("fade_in", start=100, length=100, curve="linear"), 125, 0.25),
    (Schedule("fade_in", start=100, length=100), 150, math.sin(math.pi / 4)),
    (Schedule("fade_out", start=100, length=100), 125, math.cos(math.pi / 8)),
    (Schedule("fade_out", start=100, length=100), 200, 0.0),
    (Schedule("fade_out", start=100, length=100), 50, 1.0),
])
def test_schedules_match_their_closed_forms(schedule, step, expected):
    assert schedule(step) == pytest.approx(expected, abs=1e-12)


def test_keyframes_interpolate_and_hold():
    s = Schedule("keyframes", points=((100, 0.0), (200, 1.0), (400, 0.5)))
    assert [s(t) for t in (0, 100, 150, 200, 300, 400, 10**6)] == pytest.approx([0, 0, 0.5, 1, 0.75, 0.5, 0.5])
    assert Schedule("keyframes", points=[(7, 0.3)])(0) == 0.3


def test_equal_power_fades_keep_total_power():
    out, into = Schedule("fade_out", start=10, length=90), Schedule("fade_in", start=10, length=90)
    for t in range(0, 120, 7):
        assert out(t) ** 2 + into(t) ** 2 == pytest.approx(1.0)
    lin_out, lin_in = Schedule("fade_out", length=90, curve="linear"), Schedule("fade_in", length=90, curve="linear")
    assert all(lin_out(t) + lin_in(t) == pytest.approx(1.0) for t in range(0, 120, 7))


def test_crossfade_fades_a_out_and_b_in():
    a, b = crossfade("notes:C", "notes:G", 0.45, start=50, length=100)
    assert (a.key, b.key, a.coefficient, b.coefficient) == ("notes:C", "notes:G", 0.45, 0.45)
    assert (a.schedule(50), b.schedule(50), a.schedule(150), b.schedule(150)) == (1.0, 0.0, 0.0, 1.0)
    assert a.schedule.curve == b.schedule.curve == "equal_power"
    with pytest.raises(ValueError, match="two different directions"):
        crossfade("notes:C", "notes:C", 0.45)


@pytest.mark.parametrize("text", [
    "constant", "linear_rise", "linear_decay:start=100,length=500", "exp_decay:lam=0.99", "logistic:center=500,width=100",
    "sine:period=300,phase=0.5", "keyframes:0=0,500=1,1500=0.2", "fade_in:start=10,length=20,curve=linear", "fade_out",
])
def test_schedule_round_trips(text):
    s = Schedule.parse(text)
    assert Schedule.parse(str(s)) == s
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_parse_reads_values():
    s = Schedule.parse("logistic:center=500,width=100")
    assert (s.kind, s.center, s.width) == ("logistic", 500.0, 100.0)
    assert Schedule.parse("keyframes:0=0,500=1").points == ((0, 0.0), (500, 1.0))


@pytest.mark.parametrize("text,message", [
    ("", "empty schedule"),
    ("logistc", "unknown schedule 'logistc' \\(did you mean 'logistic'\\?\\)"),
    ("logistic:center", "expected key=value, got 'center'"),
    ("logistic:lam=0.5", "logistic schedule takes center, width; got 'lam'"),
    ("constant:length=3", "constant schedule takes no parameters"),
    ("logistic:center=abc", "center must be a number, got 'abc'"),
    ("logistic:width=0", "width must be > 0"),
    ("logistic:center=nan", "center must be finite"),
    ("linear_rise:length=0", "length must be >= 1"),
    ("linear_rise:length=1.5", "length must be a whole number"),
    ("linear_rise:start=-5", "start must be >= 0"),
    ("exp_decay:lam=0", "lam must be in \\(0, 1\\]"),
    ("exp_decay:lam=1.01", "lam must be in \\(0, 1\\]"),
    ("sine:period=-1", "period must be > 0"),
    ("fade_in:curve=cubic", "curve must be one of linear, equal_power"),
    ("keyframes", "at least one"),
    ("keyframes:500=1,0=0", "strictly increasing"),
    ("keyframes:0=inf", "finite"),
    ("keyframes:a=1", "STEP=VALUE"),
    ("sine:period=10,period=20", "given twice"),
])
def test_bad_schedules_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Schedule.parse(text)


def test_schedule_rejects_parameters_its_kind_ignores():
    with pytest.raises(ValueError, match="lam=0.5 does not apply"):
        Schedule("logistic", lam=0.5)
    with pytest.raises(ValueError, match="logistic schedule takes center, width; got 'lam'"):
        Schedule.from_dict({"kind": "logistic", "lam": 0.5})


# --- layer weighting ----------------------------------------------------------------------------------

SCORES = torch.tensor([0.6, 0.9, 0.7, 0.5, 0.9, 0.8])


def test_topk_picks_the_best_layers_ties_to_the_lower_index():
    assert LayerWeighting("topk", k=3).weights(SCORES).tolist() == [0, 1, 0, 0, 1, 1]
    assert LayerWeighting("topk", k=1, w0=2).weights(SCORES).tolist() == [0, 2, 0, 0, 0, 0]  # 1 beats 4
    assert LayerWeighting("topk", k=100).weights(SCORES).tolist() == [1] * 6
    assert LayerWeighting("topk").weights(SCORES).tolist() == [1] * 6


def test_linear_and_exponential_follow_the_formulas():
    s_hat = (SCORES - 0.5) / 0.4
    assert torch.allclose(LayerWeighting("linear", w0=2).weights(SCORES), 2 * s_hat)
    assert torch.allclose(LayerWeighting("exponential", kappa=0.5).weights(SCORES), s_hat**2)
    w = LayerWeighting().weights(SCORES)  # default: the paper's exponential, kappa 0.95, w0 1
    assert torch.allclose(w, s_hat ** (1 / 0.95))
    assert w[3] == 0 and w[1] == 1


@pytest.mark.parametrize("weighting", [
    LayerWeighting("all"), LayerWeighting("topk", k=2), LayerWeighting("linear", w0=0.5),
    LayerWeighting("exponential"), LayerWeighting("explicit", layer_weights=(1, 2, 3, 4)),
])
def test_equal_scores_do_not_crash(weighting):
    w = weighting.weights(torch.full((4,), 0.75))
    assert torch.isfinite(w).all()
    if weighting.mode in ("linear", "exponential"):
        assert w.tolist() == [weighting.w0] * 4  # every layer is as good as the best one
    if weighting.mode == "topk":
        assert w.tolist() == [1, 1, 0, 0]


def test_explicit_weights_and_length_mismatch():
    assert LayerWeighting("explicit", w0=2, layer_weights=(1, 0, 0.5, 0)).weights(torch.rand(4)).tolist() == [2, 0, 1, 0]
    with pytest.raises(ValueError, match="has 3 weights, the direction has 4 layers"):
        LayerWeighting("explicit", layer_weights=(1, 0, 0.5)).weights(torch.rand(4))


@pytest.mark.parametrize("text", ["all", "topk:k=8", "linear:w0=0.5", "exponential:kappa=0.95,w0=1",
                                  "explicit:weights=1/0.5/0,w0=2"])
def test_layer_weighting_round_trips(text):
    w = LayerWeighting.parse(text)
    assert LayerWeighting.parse(str(w)) == w
    assert LayerWeighting.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    assert LayerWeighting.parse("explicit:weights=1/0.5/0").layer_weights == (1.0, 0.5, 0.0)


@pytest.mark.parametrize("text,message", [
    ("topk:k=0", "k must be >= 1"),
    ("exponential:kappa=0", "kappa must be in \\(0, 1\\]"),
    ("exponential:kappa=1.5", "kappa must be in \\(0, 1\\]"),
    ("all:w0=inf", "w0 must be finite"),
    ("linear:kappa=0.9", "linear layer weighting takes w0, margin; got 'kappa'"),
    ("explicit", "one weight per layer"),
    ("explicit:weights=1/x", "weight 1 must be a number"),
    ("expo", "did you mean 'exponential'"),
])
def test_bad_layer_weightings(text, message):
    with pytest.raises(ValueError, match=message):
        LayerWeighting.parse(text)


# --- the gate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_gate_frequency_is_p(p):
    n = 20000
    hits = sum(gate_open(7, t, p) for t in range(n))
    assert abs(hits - n * p) <= 3 * math.sqrt(n * p * (1 - p))


def test_gate_is_a_pure_function_of_seed_and_step():
    forward = open_steps(3, 0.3)
    backward = sorted(t for t in reversed(range(2000)) if gate_open(3, t, 0.3))
    assert forward == backward == open_steps(3, 0.3)
    assert open_steps(4, 0.3) != forward
    assert all(gate_open(3, t, 1.0) for t in range(500))
    assert not any(gate_open(3, t, 0.0) for t in range(500))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        gate_open(0, 0, 1.5)


# --- controls and specs -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coefficients_are_rejected_naming_key_and_value(value):
    with pytest.raises(ValueError, match=f"control 'notes:C': coefficient must be finite, got {value!r}"):
        DirectionControl("notes:C", value)


def test_control_validation():
    with pytest.raises(ValueError, match="'concept:class'"):
        DirectionControl("notesC", 0.3)
    with pytest.raises(ValueError, match="must be a number, got '0.3'"):
        DirectionControl("notes:C", "0.3")


@pytest.mark.parametrize("kwargs,message", [
    ({"rows": "uncond"}, "rows must be one of both, cond"),
    ({"rule": "mul"}, "rule must be one of add, norm"),
    ({"site": "mlp"}, "site must be one of residual, attention"),
    ({"gate_p": 1.2}, "gate_p is a probability"),
    ({"gate_p": float("nan")}, "gate_p must be finite"),
    ({"gate_seed": -1}, "gate_seed must be in"),
    ({"layers": "exponential"}, "layers must be a LayerWeighting"),
    ({"controls": ("notes:C",)}, "must be DirectionControl"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SteeringSpec(**kwargs)


def test_spec_round_trips_through_json():
    spec = SteeringSpec(
        controls=(DirectionControl("notes:C", 0.45, Schedule.parse("logistic:center=500")),
                  DirectionControl("chords:major", -0.3, active=False),
                  *crossfade("notes:E", "notes:G", 0.6, start=100, length=200)),
        gate_p=0.3, gate_seed=9, layers=LayerWeighting.parse("topk:k=2"), rows="cond", rule="norm", site="attention")
    assert SteeringSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="got 'gate'"):
        SteeringSpec.from_dict({"gate": 0.3})


def test_injection_points_have_one_definition():
    assert steering_module.INJECTION_POINTS is decoder.INJECTION_POINTS is bank_module.INJECTION_POINTS


# --- the plan -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("units", ["relative", "raw"])
def test_vectors_are_the_hand_computed_sum(bank, units):
    layers = LayerWeighting("exponential", kappa=0.8, w0=1.5, margin=0.0)
    spec = SteeringSpec(controls=(DirectionControl("notes:C", 0.4),
                                  DirectionControl("notes:E", -0.25, Schedule("linear_rise", length=100)),
                                  DirectionControl("notes:D", 0.9, active=False)), layers=layers, units=units)
    plan = SteeringPlan.compile(spec, bank, FP)
    step = 30
    expected = torch.zeros(L, D)
    # relative: the strength is a fraction of each layer's typical norm; raw: hidden-state units
    scale = torch.tensor(NORMS.mean) if units == "relative" else torch.ones(L)
    for key, eta, phi in (("notes:C", 0.4, 1.0), ("notes:E", -0.25, 0.3)):
        d = bank[key]
        s_hat = (d.scores - d.scores.min()) / (d.scores.max() - d.scores.min())  # margin 0: the paper's min-max
        expected += eta * phi * (1.5 * s_hat ** (1 / 0.8) * scale)[:, None] * d.vectors
    assert torch.allclose(plan.vectors(step), expected, atol=1e-6)
    at = plan.at([step])  # what the decoder is handed: the same vectors, layer by layer
    assert torch.allclose(torch.stack([at.vector(layer) for layer in range(L)]), expected, atol=1e-6)
    assert plan.coefficients(step).tolist() == pytest.approx([0.4, -0.075, 0.0])
    assert plan.weighted.shape == (3, L, D)


def test_schedule_clock_is_the_step_even_when_the_gate_is_closed(bank):
    schedule = Schedule("linear_rise", length=1000)
    spec = SteeringSpec(controls=(DirectionControl("notes:C", 0.6, schedule),), gate_p=0.3, gate_seed=5)
    plan = SteeringPlan.compile(spec, bank, FP)
    opened = open_steps(5, 0.3, 200)
    closed = sorted(set(range(200)) - set(opened))
    assert 40 < len(opened) < 90
    for t in opened[-5:]:  # the 5th-from-last open step is far past the 5th open step: phi read at t itself
        assert plan.coefficients(t).item() == pytest.approx(0.6 * t / 1000)
    for t in closed[:5]:
        assert plan.is_zero(t) and torch.count_nonzero(plan.vectors(t)) == 0
    assert not plan.is_zero(opened[-1])


def test_coefficients_for_steps_stacks_single_steps(bank):
    spec = SteeringSpec(controls=crossfade("notes:C", "notes:D", 0.5, length=40), gate_p=0.5)
    plan = SteeringPlan.compile(spec, bank, FP)
    steps = list(range(10, 30))
    assert torch.equal(plan.coefficients_for_steps(steps), torch.stack([plan.coefficients(t) for t in steps]))
    assert plan.coefficients_for_steps([]).shape == (0, 2)


def test_empty_spec_compiles_without_a_bank():
    plan = SteeringPlan.compile(SteeringSpec(), None, FP, dtype=torch.float64)
    assert plan.is_zero(0)
    v = plan.vectors(0)
    assert v.shape == (L, D) and v.dtype == torch.float64 and not v.any()


def test_compile_checks_bank_model_keys_and_site(bank):
    spec = SteeringSpec(controls=(DirectionControl("notes:Cb", 0.3),))
    with pytest.raises(UnknownDirectionError, match="no direction 'notes:Cb'.*available: notes: C D E"):
        SteeringPlan.compile(spec, bank, FP)
    ok = SteeringSpec(controls=(DirectionControl("notes:C", 0.3),))
    with pytest.raises(BankMismatchError, match="model is musicgen with 24 layers x hidden size 1024"):
        SteeringPlan.compile(ok, bank, ModelFingerprint("musicgen", 24, 1024))
    with pytest.raises(ValueError, match="need a direction bank"):
        SteeringPlan.compile(ok, None, FP)
    with pytest.raises(ValueError, match="read at the 'residual' injection point.*site 'attention'"):
        SteeringPlan.compile(SteeringSpec(controls=ok.controls, site="attention"), bank, FP)
    with pytest.raises(ValueError, match="has 2 weights, the direction has 4 layers"):
        SteeringPlan.compile(SteeringSpec(controls=ok.controls, layers=LayerWeighting.parse("explicit:weights=1/1")),
                             bank, FP)


# --- update rules -------------------------------------------------------------------------------------


def test_add_rule():
    h, v = torch.randn(2, 3, D), torch.randn(D)
    assert torch.equal(apply_steering(h, v, "add"), h + v)


def test_norm_rule_matches_the_paper_formula_and_bounds_the_norm():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, D, generator=g)
    r = torch.randn(D, generator=g)
    r = r / r.norm()
    h_norm = h.norm(dim=-1, keepdim=True)
    for alpha in (0.1, 0.5, 2.0):
        out = apply_steering(h, alpha * r, "norm")
        assert torch.allclose(out, (h + alpha * h_norm * r) / (1 + alpha), atol=1e-6)
        assert (out.norm(dim=-1) <= h.norm(dim=-1) + 1e-5).all()
        assert (torch.cosine_similarity(out, r, dim=-1) > torch.cosine_similarity(h, r, dim=-1)).all()
    # A negative coefficient points along -r: still defined, and it pushes away from r.
    away = apply_steering(h, -0.5 * r, "norm")
    assert torch.allclose(away, (h - 0.5 * h_norm * r) / 1.5, atol=1e-6)
    assert (torch.cosine_similarity(away, r, dim=-1) < torch.cosine_similarity(h, r, dim=-1)).all()
    # h along r keeps its norm exactly; a zero vector changes nothing.
    along = 3.0 * r
    assert apply_steering(along, 0.7 * r, "norm").norm() == pytest.approx(3.0)
    assert torch.equal(apply_steering(h, torch.zeros(D), "norm"), h)


def test_norm_rule_broadcasts_per_position_vectors():
    h, v = torch.randn(2, 3, D), torch.randn(3, D)
    out = apply_steering(h, v, "norm")
    assert torch.allclose(out[1, 2], apply_steering(h[1, 2], v[2], "norm"))


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown steering rule 'mul'"):
        apply_steering(torch.zeros(D), torch.zeros(D), "mul")


# --- strength units and the robust layer weighting ----------------------------------------------------


def test_relative_strength_is_a_fraction_of_each_layers_norm(bank):
    """s adds s x (the layer's typical norm) x w_l along the unit direction: the vector's norm at each layer is
    exactly that, and raw units are the same vectors without the norms."""
    control = (DirectionControl("notes:C", 0.3),)
    everywhere = LayerWeighting("all")
    relative = SteeringPlan.compile(SteeringSpec(controls=control, layers=everywhere), bank, FP)
    raw = SteeringPlan.compile(SteeringSpec(controls=control, layers=everywhere, units="raw"), bank, FP)
    norms = torch.linalg.vector_norm(relative.vectors(0), dim=1)
    assert norms.tolist() == pytest.approx([0.3 * n for n in NORMS.mean], rel=1e-5)
    assert torch.linalg.vector_norm(raw.vectors(0), dim=1).tolist() == pytest.approx([0.3] * L, rel=1e-5)
    assert relative.vector_norms() == {"notes:C": pytest.approx([0.3 * n for n in NORMS.mean], rel=1e-4)}
    # a change of units is a change of weighted directions: not re-used from the other plan
    assert not relative.directions_match(raw.spec)


def test_relative_strength_needs_the_banks_layer_norms(bank):
    plain = DirectionBank(bank.directions, FP, "rfm", "mean")
    spec = SteeringSpec(controls=(DirectionControl("notes:C", 0.3),))
    with pytest.raises(ValueError, match="relative strength needs the bank's layer norms"):
        SteeringPlan.compile(spec, plain, FP)
    SteeringPlan.compile(SteeringSpec(controls=spec.controls, units="raw"), plain, FP)  # raw units do not
    with pytest.raises(ValueError, match="units must be one of relative, raw"):
        SteeringSpec(units="percent")


def test_near_equal_scores_get_near_equal_weights():
    """The bundled notes bank's G#: AUCs within 0.023 of each other. Min-max made its weights [0, .23, .48, 1]
    (so a strength steered it at less than half of C, whose AUCs were all 1); with the default margin they stay
    within 25 % of each other. Scores that spread by more than the margin keep the paper's min-max."""
    near = torch.tensor([0.977, 0.982, 0.988, 1.0])
    paper = LayerWeighting("linear", margin=0.0).weights(near)
    assert paper.tolist() == pytest.approx([0.0, 0.2174, 0.4783, 1.0], abs=1e-3)
    robust = LayerWeighting("linear").weights(near)
    assert robust.min() >= 0.75 and robust.max() == pytest.approx(1.0)
    assert torch.all(robust[1:] >= robust[:-1])  # still ordered like the scores
    wide = torch.tensor([0.55, 0.7, 0.9, 0.99])
    for mode in ("linear", "exponential"):
        assert torch.allclose(LayerWeighting(mode).weights(wide), LayerWeighting(mode, margin=0.0).weights(wide))
    assert LayerWeighting("exponential").weights(torch.ones(4)).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="margin must be >= 0"):
        LayerWeighting("linear", margin=-0.1)
    with pytest.raises(ValueError, match="takes k, w0"):
        LayerWeighting.parse("topk:k=2,margin=0.2")
    assert LayerWeighting.parse(str(LayerWeighting("exponential", margin=0.05))) == LayerWeighting("exponential",
                                                                                                     margin=0.05)


def test_legacy_specs_read_as_they_were_made():
    """A sidecar or log written before units and the margin existed was raw units and exact min-max."""
    old = {"controls": [{"key": "notes:C", "coefficient": 25.0}], "gate_p": 0.3, "gate_seed": 0,
           "layers": {"mode": "exponential", "kappa": 0.95, "w0": 1.0}, "rows": "both", "rule": "add",
           "site": "residual"}
    spec = SteeringSpec.from_dict(steering_module.legacy_spec(old))
    assert spec.units == "raw" and spec.layers.margin == 0.0
    assert SteeringSpec.from_dict(old).units == "relative"  # a new spec without units: the default
    flat = steering_module.legacy_spec({"layers": "linear:w0=2", "units": "relative"})
    assert flat == {"layers": "linear:w0=2,margin=0", "units": "relative"}
    assert steering_module.legacy_spec({"layers": "topk:k=2"}) == {"layers": "topk:k=2", "units": "raw"}


@pytest.mark.parametrize("make", [
    lambda big: Schedule.parse(f"linear_rise:{big}"),
    lambda big: Schedule.parse(big),
    lambda big: LayerWeighting.parse(f"exponential:{big}=1"),
    lambda big: DirectionControl(big, 0.5),
    lambda big: Schedule.from_dict({"kind": "keyframes", "points": [[0, 1, big]]}),
])
def test_errors_quote_a_huge_value_short(make):
    """A 60 KB value from a client is quoted cut short, with its length, never in full."""
    big = "x" * 60_000
    with pytest.raises(ValueError) as info:
        make(big)
    assert len(str(info.value)) < 1_500 and "characters)" in str(info.value)
