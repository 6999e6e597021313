"""Steering as a small, pure function of (controls, generation step) -> per-layer vectors.

The MusicRFM update (paper Sec. 3.3, App. C) adds to the hidden state of layer l at generation step t

    sum_m  eta0_m * w_{l,m} * phi_m(t) * psi_p(t) * q_{l,m}

  q_{l,m}   unit direction of control m at layer l (from a DirectionBank)
  w_{l,m}   layer weight, from the direction's own per-layer validation scores (`LayerWeighting`)
  phi_m(t)  deterministic schedule (`Schedule`); t is the generation step, 50 steps = 1 s
  psi_p(t)  Bernoulli gate (`gate_open`): ONE draw per step, shared by every layer and direction
  eta0_m    the control's strength (`DirectionControl.coefficient`), in the spec's `units`:
            "relative" (the default): eta0_m = s_m x n_l, where n_l is layer l's typical activation norm at
                        the injection point (the bank's `LayerNorms`), so s = 0.3 adds 30 % of each layer's
                        size, and a knob means the same on musicgen-mini, -small and -large; with the
                        norm-preserving rule s is its alpha, already a share of each token's own norm;
            "raw":      eta0_m in hidden-state units, as the paper writes it (its 0.15-0.6 are for
                        MusicGen-large's scale); for reproducing its tables.

Two corrections to the reference code are deliberate: the schedule clock is the generation step
whether or not the gate fired (the reference advanced it on gated-in steps only), and the gate is a
pure function of (seed, step), one per step, so a render is reproducible from its sidecar and a live
change of controls never reshuffles the gate sequence.

`SteeringSpec` is the user-facing, JSON-able description; `SteeringPlan.compile` resolves it against a
bank into tensors once, after which each step costs a few float multiplies and one small einsum:
`plan.at(steps)` is the `StepSteering` the decoder applies at every layer.

One kind of control reads the hidden state: `quality:<major|minor|aug|dim>` (`QUALITY_TONES`) steers a chord's
quality relative to the root the model is holding, read from the residual at each layer and position with the
notes bank as the readout. It is the one exception to "a function of (controls, step)", because on the measured
model a chord quality is not a direction at all, only a relation to a root (docs/musicgen-mini.md).
"""

from __future__ import annotations

import bisect
import difflib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch

from musicrfm.protocol import fields as checks

from .bank import Direction, DirectionBank
from .decoder import INJECTION_POINTS
from .model import ModelFingerprint

__all__ = [
    "Schedule",
    "LayerWeighting",
    "DirectionControl",
    "SteeringSpec",
    "SteeringPlan",
    "crossfade",
    "gate_open",
    "gate_uniform",
    "StepSteering",
    "BatchSteering",
    "apply_steering",
    "SCHEDULE_KINDS",
    "LAYER_MODES",
    "ROWS",
    "RULES",
    "UNITS",
    "legacy_spec",
    "QUALITY_CONCEPT",
    "QUALITY_TONES",
    "READOUT_CONCEPT",
    "read_roots",
    "PITCH_CLASSES",
    "check_control_key",
    "steerable_keys",
]

ROWS = ("both", "cond")  # guidance rows steered: both (paper) or the conditional row only
RULES = ("add", "norm")  # h + v (paper), or the norm-preserving update of the activation-steering paper
UNITS = ("relative", "raw")  # strength as a fraction of each layer's typical norm (default), or hidden-state units

# Parameters each schedule kind reads; any other parameter must stay at its default, so that
# to_dict()/str() (which write only these) describe the schedule completely.
_SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear_rise": ("start", "length"),
    "linear_decay": ("start", "length"),
    "exp_decay": ("start", "lam"),
    "logistic": ("center", "width"),
    "sine": ("period", "phase"),
    "keyframes": ("points",),
    "fade_in": ("start", "length", "curve"),
    "fade_out": ("start", "length", "curve"),
}
SCHEDULE_KINDS = tuple(_SCHEDULE_PARAMS)
CURVES = ("linear", "equal_power")

# External parameter name -> field name (the method `weights()` owns the name "weights").
_LAYER_PARAMS: dict[str, tuple[str, ...]] = {
    "all": ("w0",),
    "topk": ("k", "w0"),
    "linear": ("w0", "margin"),
    "exponential": ("kappa", "w0", "margin"),
    "explicit": ("weights", "w0"),
}
LAYER_MODES = tuple(_LAYER_PARAMS)
_LAYER_FIELD = {"weights": "layer_weights"}


# --- small validation and parsing helpers -----------------------------------------------------------


def _number(owner: str, name: str, value: Any) -> float:
    return checks.number(f"{owner}: {name}", value)


def _whole(owner: str, name: str, value: Any) -> int:
    return checks.whole(f"{owner}: {name}", value, integral_floats=True)  # JSON writers may turn 1500 into 1500.0


def _choice(owner: str, name: str, value: Any, options: Sequence[str]) -> str:
    return checks.choice(f"{owner}: {name}", value, options)


def _unknown_name(what: str, name: str, options: Sequence[str]) -> ValueError:
    near = [o for o in options if name and o.startswith(name)] or difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return ValueError(f"unknown {what} {checks.shown(name)}{hint}; choose one of {', '.join(options)}")


def _check_params(owner: str, given: Sequence[str], allowed: Sequence[str]) -> None:
    bad = [g for g in given if g not in allowed]
    if bad:
        takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
        raise ValueError(f"{owner} {takes}; got {', '.join(checks.shown(b) for b in bad[:3])}")


def _split_options(text: Any, what: str) -> tuple[str, dict[str, str]]:
    """'name:key=value,key=value' -> ('name', {key: value}) with clear errors for malformed items."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty {what}: expected NAME or NAME:key=value,...")
    name, _, rest = text.strip().partition(":")
    options: dict[str, str] = {}
    for item in rest.split(",") if rest.strip() else []:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"{what} {checks.shown(text)}: expected key=value, got {checks.shown(item.strip())}")
        if key in options:
            raise ValueError(f"{what} {checks.shown(text)}: {checks.shown(key)} is given twice")
        options[key] = value
    return name.strip(), options


def _literal(text: str) -> int | float | str:
    """A command-line value: int if it reads as one, else float, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _set(obj: object, name: str, value: Any) -> None:
    """Store a normalised field value on a frozen dataclass during __post_init__."""
    object.__setattr__(obj, name, value)


def _defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _check_unused_at_default(obj, owner: str, used: Sequence[str], skip: str) -> None:
    for name, default in _defaults(type(obj)).items():
        if name != skip and name not in used and getattr(obj, name) != default:
            takes = f"takes {', '.join(used)}" if used else "takes no parameters"
            raise ValueError(f"{owner} {takes}; {name}={checks.shown(getattr(obj, name))} does not apply")


# --- schedules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """phi(t): the strength of one control over generation steps t (50 steps = 1 s).

    constant       1
    linear_rise    clip((t - start) / length, 0, 1)             paper: t / 1500
    linear_decay   1 - linear_rise
    exp_decay      lam ** max(t - start, 0)                     paper: 0.998 ** t
    logistic       1 / (1 + exp(-(t - center) / width))         paper: center 750, width 200
    sine           0.5 * (1 + sin(2 pi t / period + phase))     paper: period 1500
    keyframes      piecewise linear through (step, value) points, held constant outside them
    fade_in/out    from `start` over `length` steps; curve "linear" or "equal_power" (sin/cos quarter
                   wave: a fade-in and a fade-out of the same timing have squares summing to 1, so two
                   orthogonal unit directions crossfade at constant total norm)
    """

    kind: str = "constant"
    start: int = 0
    length: int = 1500
    lam: float = 0.998
    center: float = 750.0
    width: float = 200.0
    period: float = 1500.0
    phase: float = 0.0
    curve: str = "equal_power"
    points: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _SCHEDULE_PARAMS:
            raise _unknown_name("schedule", str(self.kind), SCHEDULE_KINDS)
        owner = f"{self.kind} schedule"
        used = _SCHEDULE_PARAMS[self.kind]
        _check_unused_at_default(self, owner, used, skip="kind")
        if "start" in used:
            _set(self, "start", _whole(owner, "start", self.start))
            if self.start < 0:
                raise ValueError(f"{owner}: start must be >= 0 steps, got {self.start}")
        if "length" in used:
            _set(self, "length", _whole(owner, "length", self.length))
            if self.length < 1:
                raise ValueError(f"{owner}: length must be >= 1 step, got {self.length}")
        if "lam" in used:
            _set(self, "lam", _number(owner, "lam", self.lam))
            if not 0 < self.lam <= 1:
                raise ValueError(f"{owner}: lam must be in (0, 1], got {self.lam}")
        for name in ("center", "phase"):
            if name in used:
                _set(self, name, _number(owner, name, getattr(self, name)))
        for name in ("width", "period"):
            if name in used:
                _set(self, name, _number(owner, name, getattr(self, name)))
                if getattr(self, name) <= 0:
                    raise ValueError(f"{owner}: {name} must be > 0, got {getattr(self, name)}")
        if "curve" in used:
            _choice(owner, "curve", self.curve, CURVES)
        if "points" in used:
            _set(self, "points", self._checked_points(owner))

    def _checked_points(self, owner: str) -> tuple[tuple[int, float], ...]:
        try:
            raw = [tuple(p) for p in self.points]
        except TypeError:
            raise ValueError(f"{owner}: points must be (step, value) pairs, got {checks.shown(self.points)}") from None
        if not raw:
            raise ValueError(f"{owner}: needs at least one (step, value) point")
        points = []
        for p in raw:
            if len(p) != 2:
                raise ValueError(f"{owner}: points must be (step, value) pairs, got {checks.shown(p)}")
            points.append((_whole(owner, "a point's step", p[0]), _number(owner, f"the value at step {p[0]}", p[1])))
        steps = [s for s, _ in points]
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"{owner}: point steps must be strictly increasing, got {steps}")
        return tuple(points)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"generation steps start at 0, got {step}")
        kind = self.kind
        if kind == "constant":
            return 1.0
        if kind in ("linear_rise", "linear_decay", "fade_in", "fade_out"):
            x = min(max((step - self.start) / self.length, 0.0), 1.0)
            rising = kind in ("linear_rise", "fade_in")
            if kind.startswith("linear") or self.curve == "linear":
                return x if rising else 1.0 - x
            if x in (0.0, 1.0):  # exact ends: cos(pi/2) is 6e-17, and a finished fade must read as zero
                return x if rising else 1.0 - x
            return math.sin(0.5 * math.pi * x) if rising else math.cos(0.5 * math.pi * x)
        if kind == "exp_decay":
            return self.lam ** max(step - self.start, 0)
        if kind == "logistic":
            z = (step - self.center) / self.width
            if z >= 0:  # the two branches keep exp() from overflowing far from the centre
                return 1.0 / (1.0 + math.exp(-z))
            e = math.exp(z)
            return e / (1.0 + e)
        if kind == "sine":
            return 0.5 * (1.0 + math.sin(2.0 * math.pi * step / self.period + self.phase))
        # keyframes
        steps = [s for s, _ in self.points]
        i = bisect.bisect_right(steps, step)
        if i == 0:
            return self.points[0][1]
        if i == len(steps):
            return self.points[-1][1]
        (s0, v0), (s1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (step - s0) / (s1 - s0)

    def shifted(self, steps: int) -> "Schedule":
        """The same curve started `steps` later: shifted(n)(t + n) == self(t) for every t >= 0. A live
        change says "fade in over 10 s from now"; shifting puts it on the stream's absolute clock."""
        n = _whole("schedule shift", "steps", steps)
        if n < 0:
            raise ValueError(f"a schedule can only be shifted later, got {n} steps")
        if n == 0 or self.kind == "constant":
            return self
        kind = self.kind
        if kind == "logistic":
            return replace(self, center=self.center + n)
        if kind == "sine":
            return replace(self, phase=math.remainder(self.phase - 2.0 * math.pi * n / self.period, 2.0 * math.pi))
        if kind == "keyframes":
            return replace(self, points=tuple((s + n, v) for s, v in self.points))
        return replace(self, start=self.start + n)  # linear_*, fade_*, exp_decay

    # serialisation ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        for name in _SCHEDULE_PARAMS[self.kind]:
            value = getattr(self, name)
            out[name] = [list(p) for p in value] if name == "points" else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"a schedule must be a dict with a 'kind', got {checks.shown(d)}")
        kind = d["kind"]
        if kind not in _SCHEDULE_PARAMS:
            raise _unknown_name("schedule", str(kind), SCHEDULE_KINDS)
        params = {k: v for k, v in d.items() if k != "kind"}
        _check_params(f"{kind} schedule", list(params), _SCHEDULE_PARAMS[kind])
        return cls(kind, **params)

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """'kind' or 'kind:key=value,...', e.g. 'logistic:center=500,width=100'; keyframes are written
        'keyframes:STEP=VALUE,...', e.g. 'keyframes:0=0,500=1,1500=0.2'."""
        kind, options = _split_options(text, "schedule")
        if kind not in _SCHEDULE_PARAMS:
            raise _unknown_name("schedule", kind, SCHEDULE_KINDS)
        if kind == "keyframes":
            points = []
            for step, value in options.items():
                s, v = _literal(step), _literal(value)
                if not isinstance(s, int) or isinstance(v, str):
                    raise ValueError(f"schedule {checks.shown(text)}: keyframes are STEP=VALUE with a whole step, got {step}={value}")
                points.append((s, v))
            return cls("keyframes", points=tuple(points))
        _check_params(f"{kind} schedule", list(options), _SCHEDULE_PARAMS[kind])
        return cls(kind, **{k: _literal(v) for k, v in options.items()})

    def __str__(self) -> str:
        """The canonical command-line form: Schedule.parse(str(s)) == s."""
        if self.kind == "keyframes":
            items = [f"{s}={_format(v)}" for s, v in self.points]
        else:
            items = [f"{name}={_format(getattr(self, name))}" for name in _SCHEDULE_PARAMS[self.kind]]
        return self.kind + (":" + ",".join(items) if items else "")


# --- layer weighting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerWeighting:
    """w_l from a direction's per-layer validation scores s_l (paper Sec. 3.3.1, App. C.2).

    all          w0 on every layer (the paper's "naive" steering)
    topk         w0 on the k best-scoring layers (ties: lower layer first), 0 elsewhere; k=None or
                 k >= L means all layers
    linear       w0 * s_hat,             s_hat = 1 - (max s - s) / max(max s - min s, margin)
    exponential  w0 * s_hat ** (1/kappa) (paper's best: kappa 0.95, w0 1)
    explicit     w0 * the given weights (one per layer; written "explicit:weights=1/0.5/0" on a command line)

    s_hat is the paper's min-max normalisation whenever the scores spread by at least `margin` (0.1 by
    default, in the scores' units: AUC or R^2). Scores closer together than that are mostly validation noise
    (on the bundled notes bank, AUCs within 0.023 of each other, about five validation clips, made the
    min-max weights of G# [0, .23, .48, 1] and of C [1, 1, 1, 1], so one strength steered G# at less than
    half of C): the spread is then measured against the margin, and near-equal layers get near-equal weights.
    margin = 0 is the paper's exact min-max. When all scores are equal s_hat is all ones.
    """

    mode: str = "exponential"
    w0: float = 1.0
    kappa: float = 0.95
    k: int | None = None
    layer_weights: tuple[float, ...] = ()
    margin: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in _LAYER_PARAMS:
            raise _unknown_name("layer weighting", str(self.mode), LAYER_MODES)
        owner = f"{self.mode} layer weighting"
        used = tuple(_LAYER_FIELD.get(p, p) for p in _LAYER_PARAMS[self.mode])
        _check_unused_at_default(self, owner, used, skip="mode")
        _set(self, "w0", _number(owner, "w0", self.w0))
        if "kappa" in used:
            _set(self, "kappa", _number(owner, "kappa", self.kappa))
            if not 0 < self.kappa <= 1:
                raise ValueError(f"{owner}: kappa must be in (0, 1], got {self.kappa}")
        if "margin" in used:
            _set(self, "margin", _number(owner, "margin", self.margin))
            if self.margin < 0:
                raise ValueError(f"{owner}: margin must be >= 0, got {self.margin}")
        if "k" in used and self.k is not None:
            _set(self, "k", _whole(owner, "k", self.k))
            if self.k < 1:
                raise ValueError(f"{owner}: k must be >= 1, got {self.k}")
        if "layer_weights" in used:
            try:
                values = tuple(_number(owner, f"weight {i}", w) for i, w in enumerate(self.layer_weights))
            except TypeError:
                raise ValueError(f"{owner}: weights must be a list of numbers, got {checks.shown(self.layer_weights)}") from None
            if not values:
                raise ValueError(f"{owner}: needs one weight per layer")
            _set(self, "layer_weights", values)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-layer weights [L] (float32, on the scores' device) for one direction's scores [L]."""
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.numel() == 0:
            raise ValueError(f"layer scores must be a non-empty 1-D tensor, got {scores!r}")
        s = scores.detach().to(torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("layer scores contain NaN or inf")
        n = s.shape[0]
        if self.mode == "explicit":
            if len(self.layer_weights) != n:
                raise ValueError(f"explicit layer weighting has {len(self.layer_weights)} weights, "
                                 f"the direction has {n} layers")
            w = torch.tensor(self.layer_weights, dtype=torch.float32, device=s.device)
        elif self.mode == "all" or (self.mode == "topk" and (self.k is None or self.k >= n)):
            w = torch.ones_like(s)
        elif self.mode == "topk":
            # A stable descending sort keeps equal scores in layer order: ties go to the lower layer.
            best = torch.sort(s, descending=True, stable=True).indices[: self.k]
            w = torch.zeros_like(s)
            w[best] = 1.0
        else:
            lo, hi = s.min(), s.max()
            spread = max(float(hi - lo), self.margin)
            # Equal scores: no layer is worse than another. (The reference code divided by zero here.)
            s_hat = 1.0 - (hi - s) / spread if spread > 0 else torch.ones_like(s)
            w = s_hat if self.mode == "linear" else s_hat ** (1.0 / self.kappa)
        return self.w0 * w

    @classmethod
    def single(cls, layer: int, num_layers: int, w0: float = 1.0) -> "LayerWeighting":
        """Steering at one layer only (the linear-probe method's chosen layer): explicit weights, w0 there and 0
        elsewhere, so a sidecar records plain weights that replay without the bank's metadata."""
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {num_layers} (0..{num_layers - 1})")
        return cls("explicit", w0=w0, layer_weights=tuple(1.0 if i == layer else 0.0 for i in range(num_layers)))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode}
        for name in _LAYER_PARAMS[self.mode]:
            value = getattr(self, _LAYER_FIELD.get(name, name))
            out[name] = list(value) if name == "weights" else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LayerWeighting":
        if not isinstance(d, dict) or "mode" not in d:
            raise ValueError(f"a layer weighting must be a dict with a 'mode', got {checks.shown(d)}")
        mode = d["mode"]
        if mode not in _LAYER_PARAMS:
            raise _unknown_name("layer weighting", str(mode), LAYER_MODES)
        params = {k: v for k, v in d.items() if k != "mode"}
        _check_params(f"{mode} layer weighting", list(params), _LAYER_PARAMS[mode])
        return cls(mode, **{_LAYER_FIELD.get(k, k): v for k, v in params.items()})

    @classmethod
    def parse(cls, text: str) -> "LayerWeighting":
        """'mode' or 'mode:key=value,...', e.g. 'exponential:kappa=0.95,w0=1', 'topk:k=8',
        'explicit:weights=1/0.5/0' (weights separated by '/')."""
        mode, options = _split_options(text, "layer weighting")
        if mode not in _LAYER_PARAMS:
            raise _unknown_name("layer weighting", mode, LAYER_MODES)
        _check_params(f"{mode} layer weighting", list(options), _LAYER_PARAMS[mode])
        params: dict[str, Any] = {}
        for key, value in options.items():
            if key == "weights":
                params["layer_weights"] = tuple(_literal(v.strip()) for v in value.split("/"))
            else:
                params[key] = _literal(value)
        return cls(mode, **params)

    def __str__(self) -> str:
        items = []
        for name in _LAYER_PARAMS[self.mode]:
            value = getattr(self, _LAYER_FIELD.get(name, name))
            if name == "k" and value is None:
                continue
            items.append(f"{name}=" + ("/".join(map(_format, value)) if name == "weights" else _format(value)))
        return self.mode + (":" + ",".join(items) if items else "")


# --- controls and the spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectionControl:
    """One direction to steer toward: key "concept:class", strength `coefficient` (eta0, in the spec's units),
    schedule phi."""

    key: str
    coefficient: float
    schedule: Schedule = field(default_factory=Schedule)
    active: bool = True

    def __post_init__(self) -> None:
        concept, sep, cls = self.key.partition(":") if isinstance(self.key, str) else ("", "", "")
        if not (concept and sep and cls):
            raise ValueError(f"a control's key must be 'concept:class' (e.g. 'notes:C'), got {checks.shown(self.key)}")
        _set(self, "coefficient", _number(f"control {checks.shown(self.key)}", "coefficient", self.coefficient))
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"control {checks.shown(self.key)}: schedule must be a Schedule, got {type(self.schedule).__name__}")
        if not isinstance(self.active, bool):
            raise ValueError(f"control {checks.shown(self.key)}: active must be true or false, got {checks.shown(self.active)}")

    def to_dict(self) -> dict:
        return {"key": self.key, "coefficient": self.coefficient, "schedule": self.schedule.to_dict(),
                "active": self.active}

    @classmethod
    def from_dict(cls, d: dict) -> "DirectionControl":
        if not isinstance(d, dict):
            raise ValueError(f"a control must be a dict, got {checks.shown(d)}")
        _check_params("a control", list(d), ("key", "coefficient", "schedule", "active"))
        if "key" not in d or "coefficient" not in d:
            raise ValueError(f"a control needs 'key' and 'coefficient', got {checks.shown(d)}")
        schedule = Schedule.from_dict(d["schedule"]) if "schedule" in d else Schedule()
        return cls(d["key"], d["coefficient"], schedule, d.get("active", True))


def crossfade(a_key: str, b_key: str, coefficient: float, start: int = 0, length: int = 1500,
              curve: str = "equal_power") -> tuple[DirectionControl, DirectionControl]:
    """Fade direction `a_key` out while `b_key` fades in, both at strength `coefficient` (paper Sec. 6.2's
    n1 -> n2). Equal-power by default: for orthogonal unit directions the total norm stays constant."""
    if a_key == b_key:
        raise ValueError(f"crossfade needs two different directions, got {checks.shown(a_key)} twice")
    return (DirectionControl(a_key, coefficient, Schedule("fade_out", start=start, length=length, curve=curve)),
            DirectionControl(b_key, coefficient, Schedule("fade_in", start=start, length=length, curve=curve)))


_SPEC_FIELDS = ("controls", "gate_p", "gate_seed", "layers", "rows", "rule", "site", "units")


@dataclass(frozen=True)
class SteeringSpec:
    """Everything that decides what steering does, JSON-able (the render sidecar stores `to_dict()`)."""

    controls: tuple[DirectionControl, ...] = ()
    gate_p: float = 1.0
    gate_seed: int = 0
    layers: LayerWeighting = field(default_factory=LayerWeighting)
    rows: str = "both"
    rule: str = "add"
    site: str = "residual"
    units: str = "relative"

    def __post_init__(self) -> None:
        try:
            controls = tuple(self.controls)
        except TypeError:
            raise ValueError(f"controls must be a sequence of DirectionControl, got {checks.shown(self.controls)}") from None
        for c in controls:
            if not isinstance(c, DirectionControl):
                raise ValueError(f"controls must be DirectionControl objects, got {type(c).__name__}")
        _set(self, "controls", controls)
        p = _number("steering", "gate_p", self.gate_p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"steering: gate_p is a probability in [0, 1], got {p}")
        _set(self, "gate_p", p)
        seed = checks.whole("steering: gate_seed", self.gate_seed)  # a seed is an integer: 3.0 is refused
        if not 0 <= seed < 2**64:
            raise ValueError(f"steering: gate_seed must be in [0, 2**64), got {seed}")
        _set(self, "gate_seed", seed)
        if not isinstance(self.layers, LayerWeighting):
            raise ValueError(f"steering: layers must be a LayerWeighting, got {type(self.layers).__name__}")
        _choice("steering", "rows", self.rows, ROWS)
        _choice("steering", "rule", self.rule, RULES)
        _choice("steering", "site", self.site, INJECTION_POINTS)
        _choice("steering", "units", self.units, UNITS)

    def to_dict(self) -> dict:
        return {"controls": [c.to_dict() for c in self.controls], "gate_p": self.gate_p,
                "gate_seed": self.gate_seed, "layers": self.layers.to_dict(), "rows": self.rows,
                "rule": self.rule, "site": self.site, "units": self.units}

    @classmethod
    def from_dict(cls, d: dict) -> "SteeringSpec":
        if not isinstance(d, dict):
            raise ValueError(f"a steering spec must be a dict, got {checks.shown(d)}")
        _check_params("a steering spec", list(d), _SPEC_FIELDS)
        kwargs = dict(d)
        if "controls" in kwargs:
            if not isinstance(kwargs["controls"], list):
                raise ValueError(f"a steering spec's controls must be a list, got {checks.shown(kwargs['controls'])}")
            kwargs["controls"] = tuple(DirectionControl.from_dict(c) for c in kwargs["controls"])
        if "layers" in kwargs:
            kwargs["layers"] = LayerWeighting.from_dict(kwargs["layers"])
        return cls(**kwargs)


def legacy_spec(d: Any) -> Any:
    """A steering spec (or a state's flat steering fields) as written before strength had units and the layer
    weighting a margin: raw units and the paper's exact min-max, which is what those files were made with.
    Readers of older sidecars and recordings call this, so they replay to the same tokens."""
    if not isinstance(d, dict):
        return d
    out = dict(d)
    out.setdefault("units", "raw")
    layers = out.get("layers")
    if isinstance(layers, dict) and layers.get("mode") in ("linear", "exponential"):
        out["layers"] = {**layers, "margin": layers.get("margin", 0.0)}
    elif isinstance(layers, str) and layers.split(":", 1)[0].strip() in ("linear", "exponential") \
            and "margin=" not in layers:
        out["layers"] = layers + ("," if ":" in layers else ":") + "margin=0"
    return out


# --- the gate ---------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit avalanche mix."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def gate_uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step): element `step` of a SplitMix64
    stream whose state starts at mix(seed). Counter-based, so no state, no call-order dependence."""
    key = _mix64((seed + _GOLDEN64) & _MASK64)  # decorrelates nearby seeds' streams
    z = _mix64((key + (step + 1) * _GOLDEN64) & _MASK64)
    return (z >> 11) * 2.0**-53  # top 53 bits: every double in [0, 1) this way is exact


def gate_open(seed: int, step: int, p: float) -> bool:
    """psi_p(step): the one Bernoulli(p) draw of generation step `step`, shared by all layers and directions."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"gate probability must be in [0, 1], got {p}")
    if step < 0:
        raise ValueError(f"generation steps start at 0, got {step}")
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return gate_uniform(seed, step) < p


# --- chord quality relative to the sounding root ------------------------------------------------------
# Measured on musicgen-mini (docs/probes.md, docs/musicgen-mini.md): major vs minor is not one direction of the
# residual stream (fitted on 8 roots, a quality direction reads at or below chance on the other 4; root-invariant
# banks move the third no more than noise), which music theory expects: a major and a minor triad hold the same
# intervals, and differ only in which third sits above the root. So a quality control does what a musician means
# by "make it minor": it reads the root the model is holding (the pitch class whose notes-bank direction the
# hidden state projects on most, at that layer and position; the notes bank is both the readout and the pen) and
# writes, relative to that root, the quality's triad, minus the tone that would make it its neighbour: major and
# minor the other third, aug and dim the perfect fifth. Major and minor write their root twice: with equal weights
# the major third outweighed the root on some roots (E, A#) and the chord was heard as the minor triad on its third.
# Measured choices (docs/musicgen-mini.md): root and third alone moved the third as far but read major less often;
# the doubled root lifts the roots where the template check hears the change from 9 to 11 of 12 (gate 1); for aug
# it halved the augmented reads, so aug and dim keep equal weights.
QUALITY_CONCEPT = "quality"
READOUT_CONCEPT = "notes"
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
QUALITY_TONES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # quality: (semitones above the root written toward, semitones written away from)
    "major": ((0, 0, 4, 7), (3,)),
    "minor": ((0, 0, 3, 7), (4,)),
    "aug": ((0, 4, 8), (7,)),
    "dim": ((0, 3, 6), (7,)),
}


def _has_readout(bank: DirectionBank | None) -> bool:
    """The bank can carry quality controls: its notes are the 12 pitch classes, and it has no concept of its own
    named like them (whose directions a key would then name)."""
    return (bank is not None and bank.concepts.get(READOUT_CONCEPT) == list(PITCH_CLASSES)
            and QUALITY_CONCEPT not in bank.concepts)


def steerable_keys(bank: DirectionBank | None) -> list[str]:
    """Every key a control may name with `bank`: its directions, and the quality controls when it holds the 12
    notes directions they read and write with."""
    if bank is None:
        return []
    quality = [f"{QUALITY_CONCEPT}:{q}" for q in QUALITY_TONES] if _has_readout(bank) else []
    return bank.keys() + quality


def _names_quality(bank: DirectionBank, key: str) -> bool:
    """`key` names a quality control, not a bank direction (a bank's own concept of that name keeps its keys)."""
    return key.partition(":")[0] == QUALITY_CONCEPT and QUALITY_CONCEPT not in bank.concepts


def check_control_key(bank: DirectionBank, key: str) -> None:
    """Raise the error a control naming `key` gets with `bank` (UnknownDirectionError with the close keys, or a
    ValueError saying what a quality control needs); nothing when it may steer."""
    if not _names_quality(bank, key):
        bank[key]  # UnknownDirectionError lists the bank's keys
        return
    quality = key.partition(":")[2]
    if quality not in QUALITY_TONES:
        raise ValueError(f"unknown chord quality {quality!r} in {key!r}; the quality controls are "
                         f"{', '.join(f'{QUALITY_CONCEPT}:{q}' for q in QUALITY_TONES)}")
    if not _has_readout(bank):
        raise ValueError(f"{key!r} reads and writes with the notes directions (notes:C ... notes:B, 12 pitch "
                         f"classes), and the bank(s) hold none: add the notes bank (--bank notes.safetensors)")


def _weighted(direction: Direction, spec: "SteeringSpec", scale: torch.Tensor | None) -> torch.Tensor:
    """[L, d]: a direction weighted per layer by its own scores (`spec.layers`), times each layer's typical norm
    in relative units (`scale`; None in raw units): what it adds at coefficient 1."""
    w = spec.layers.weights(direction.scores)
    if scale is not None:
        w = w * scale
    return w.unsqueeze(1) * direction.vectors


def _notes_readout_and_pens(bank: DirectionBank, spec: "SteeringSpec", scale: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(readout [L, 12, d]: the unit notes directions, pens [12, L, d]: each note weighted as a notes control is)."""
    notes = [bank[f"{READOUT_CONCEPT}:{p}"] for p in PITCH_CLASSES]
    return torch.stack([n.vectors for n in notes], dim=1), torch.stack([_weighted(n, spec, scale) for n in notes])


def _quality_table(pens: torch.Tensor, quality: str) -> torch.Tensor:
    """[12 roots, L, d]: what a quality control adds at coefficient 1 on each root it may read."""
    toward, away = QUALITY_TONES[quality]
    return torch.stack([sum(pens[(r + i) % 12] for i in toward) - sum(pens[(r + i) % 12] for i in away)
                        for r in range(12)])


def read_roots(h: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
    """h [..., d], readout [12, d] -> the pitch class h projects on most, [...] (long)."""
    return (h.float() @ readout.float().T).argmax(dim=-1)


# --- the compiled plan ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SteeringPlan:
    """A SteeringSpec resolved against a bank: `weighted[m, l] = w_{l,m} q_{l,m}`, on the model's device.

    `at(steps)` hands the decoder what to add while it feeds those steps' positions."""

    spec: SteeringSpec
    weighted: torch.Tensor  # [M, L, d], M = len(spec.controls) (zeros for a quality control)
    num_layers: int
    hidden_size: int
    # Quality controls (QUALITY_TONES): their indices in spec.controls, what each adds on each root
    # [Q, 12, L, d], and the readout of the root, the unit notes directions [L, 12, d].
    quality_rows: tuple[int, ...] = ()
    quality_tables: torch.Tensor | None = None
    readout: torch.Tensor | None = None

    @classmethod
    def compile(cls, spec: SteeringSpec, bank: DirectionBank | None, fingerprint: ModelFingerprint, *,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                reuse: "SteeringPlan | None" = None) -> "SteeringPlan":
        """Check the bank against the model, resolve every key, precompute the weighted directions.
        A spec without controls needs no bank. `reuse`: a plan compiled from the same bank whose weighted
        directions still hold (same keys in the same order, same layer weighting and site: a change of
        coefficients, schedules, gate, rows or rule), taken as they are instead of compiled again."""
        if not isinstance(spec, SteeringSpec):
            raise ValueError(f"expected a SteeringSpec, got {type(spec).__name__}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        layers, hidden = fingerprint.num_layers, fingerprint.hidden_size
        if reuse is not None and reuse.directions_match(spec):
            moved = {name: getattr(reuse, name).to(device=device, dtype=dtype)
                     for name in ("quality_tables", "readout") if getattr(reuse, name) is not None}
            return cls(spec, reuse.weighted.to(device=device, dtype=dtype), layers, hidden,
                       quality_rows=reuse.quality_rows, **moved)
        if bank is None and spec.controls:
            raise ValueError("steering controls need a direction bank, and none was given")
        if bank is not None:
            bank.check_compatible(fingerprint)
            if spec.controls and bank.injection_point != spec.site:
                # Directions are only meaningful where they were read: a residual-stream direction
                # added to an attention output (or the reverse) steers along an unrelated axis.
                raise ValueError(f"the bank's directions were read at the {bank.injection_point!r} injection "
                                 f"point, but steering is set to site {spec.site!r}")
        scale = None
        # The norm-preserving rule is relative by construction ((h + alpha |h| r) / (1 + alpha): alpha is a share of
        # each token's own norm), so a relative strength is alpha itself; only the add rule needs the layer's norm.
        if spec.controls and spec.units == "relative" and spec.rule == "add":
            if bank.layer_norms is None:
                raise ValueError("relative strength needs the bank's layer norms, and this bank carries none: "
                                 "load it through engine.norms.with_layer_norms (which measures them), or use "
                                 "raw units")
            scale = bank.layer_norms.scale()  # [L]: strength s adds s x the layer's typical |h|
        rows, quality_rows, tables, readout = [], [], [], None
        for m, control in enumerate(spec.controls):
            check_control_key(bank, control.key)  # UnknownDirectionError lists the bank's keys
            if not _names_quality(bank, control.key):
                rows.append(_weighted(bank[control.key], spec, scale))
                continue
            if spec.rule != "add":
                raise ValueError(f"{control.key!r} writes chord tones with the add rule; steering is set to "
                                 f"rule {spec.rule!r}")
            if readout is None:
                readout, pens = _notes_readout_and_pens(bank, spec, scale)
            quality_rows.append(m)
            tables.append(_quality_table(pens, control.key.partition(":")[2]))
            rows.append(torch.zeros(layers, hidden))
        weighted = torch.stack(rows) if rows else torch.zeros(0, layers, hidden)
        quality = {}
        if quality_rows:
            quality = {"quality_rows": tuple(quality_rows),
                       "quality_tables": torch.stack(tables).to(device=device, dtype=dtype),
                       "readout": readout.to(device=device, dtype=dtype)}
        return cls(spec, weighted.to(device=device, dtype=dtype), layers, hidden, **quality)

    def directions_match(self, spec: SteeringSpec) -> bool:
        """True when `spec` steers along this plan's weighted directions: same keys in the same order, same
        layer weighting, site and units."""
        return (spec.site == self.spec.site and spec.layers == self.spec.layers and spec.units == self.spec.units
                and spec.rule == self.spec.rule and [c.key for c in spec.controls] == [c.key for c in self.spec.controls])

    def vector_norms(self) -> dict[str, list[float]]:
        """Per control, the norm of the vector it adds at each layer at full schedule with the gate open
        (|coefficient| x w_l x scale_l): what a strength means in hidden-state units, for sidecars and logs."""
        norms = torch.linalg.vector_norm(self.weighted.float().cpu(), dim=2)  # [M, L]
        for q, m in enumerate(self.quality_rows):  # a quality control: the mean over the 12 roots
            norms[m] = torch.linalg.vector_norm(self.quality_tables[q].float().cpu(), dim=2).mean(dim=0)
        return {c.key: [round(abs(c.coefficient) * float(n), 4) for n in norms[m]]
                for m, c in enumerate(self.spec.controls)}

    def _coefficient_values(self, step: int) -> list[float]:
        spec = self.spec
        gate = 1.0 if gate_open(spec.gate_seed, step, spec.gate_p) else 0.0
        # phi is evaluated at the generation step itself, gate open or not: the clock never pauses.
        return [c.coefficient * c.schedule(step) * gate if c.active else 0.0 for c in spec.controls]

    def coefficients(self, step: int) -> torch.Tensor:
        """eta0_m * phi_m(step) * psi_p(step) * active_m, float32 [M] on the CPU (read on the host,
        so deciding to skip a step never waits for the GPU)."""
        return torch.tensor(self._coefficient_values(step), dtype=torch.float32)

    def coefficients_for_steps(self, steps: Sequence[int]) -> torch.Tensor:
        """Coefficients of several steps at once: float32 [T, M] on the CPU."""
        values = [self._coefficient_values(s) for s in steps]
        return torch.tensor(values, dtype=torch.float32).reshape(len(values), len(self.spec.controls))

    def is_zero(self, step: int) -> bool:
        """True when nothing would be added at this step (gate closed, all faded out, or no controls)."""
        return not any(self._coefficient_values(step))

    def vectors(self, step: int) -> torch.Tensor:
        """The per-layer vectors step `step` adds, [L, d] on the plan's device and dtype (zeros when it adds
        nothing): what `at([step])` hands the decoder, layer by layer."""
        c = self.coefficients(step).to(device=self.weighted.device, dtype=self.weighted.dtype)
        return torch.einsum("m,mld->ld", c, self.weighted)

    def at(self, steps: Sequence[int]) -> "StepSteering | None":
        """What the decoder adds while it feeds the positions of `steps`: one step, or a re-prompt refill,
        where each position gets the coefficients of the step it was first generated at. None when nothing
        would be added (no controls, gate closed, everything faded out), so the caller skips the work."""
        if not self.spec.controls:
            return None
        coeffs = self.coefficients_for_steps(steps)
        return StepSteering(self, coeffs) if coeffs.any() else None


class StepSteering:
    """The steering of one forward pass (engine.decoder.LayerSteering): per-layer vectors of a plan at some
    steps, which rows, which rule, which site, and its quality controls, which read the hidden state."""

    def __init__(self, plan: SteeringPlan, coeffs: torch.Tensor):
        self.site, self.rows, self.rule = plan.spec.site, plan.spec.rows, plan.spec.rule
        self._weighted = plan.weighted  # [M, L, d]
        coeffs = coeffs.to(self._weighted)  # [T, M]
        if coeffs.shape[0] == 1:  # one step: the [L, d] vectors once, then a row per layer
            self._per_layer = torch.einsum("m,mld->ld", coeffs[0], self._weighted)
            self._coeffs = None
        else:  # a re-prompt refill: each position gets the coefficients of its own step
            self._per_layer = None
            self._coeffs = coeffs
        self._quality = None  # (coefficients [T, Q], tables [Q, 12, L, d], readout [L, 12, d])
        if plan.quality_rows:
            quality = coeffs[:, list(plan.quality_rows)]
            if quality.any():
                self._quality = (quality, plan.quality_tables, plan.readout)

    @property
    def reads_state(self) -> bool:
        """True when a quality control is on: what this steering adds depends on the hidden state."""
        return self._quality is not None

    def steer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [R, T, d] at this steering's site of `layer` -> the steered hidden states: the plan's vectors by its
        rule, then the quality controls' chord tones on the root read from the result."""
        h = apply_steering(h, self.vector(layer).to(h.dtype), self.rule)
        if self._quality is not None:
            h = h + self.quality_vector(layer, h)
        return h

    def quality_vector(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """[R, T, d]: what the quality controls add to h [R, T, d] at `layer`: each position's chord tones on the
        root it reads (`read_roots`), at the coefficient of that position's step."""
        coeffs, tables, readout = self._quality
        picked = tables[:, :, layer][:, read_roots(h, readout[layer])]  # [Q, R, T, d]
        return torch.einsum("tq,qrtd->rtd", coeffs.to(picked.dtype), picked).to(h.dtype)

    def vector(self, layer: int) -> torch.Tensor:
        """[d] for one step, [T, d] for a refill of T positions."""
        if self._per_layer is not None:
            return self._per_layer[layer]
        return self._coeffs @ self._weighted[:, layer]  # [T, d]

    def apply(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return apply_steering(h, v, self.rule)

    def layers(self) -> torch.Tensor:
        """[L, d]: every layer's vector for one step."""
        if self._per_layer is None:
            raise ValueError("layers() is for one step; this steering covers a refill of several positions")
        return self._per_layer


class BatchSteering:
    """The steering of one batched decode step (engine.decoder.RowSteering): each row of the batch has its own
    vectors (zeros where a row is not steered), its rule and its injection point. Built from the streams'
    `StepSteering`s, so a row gets exactly the vectors it gets when its stream steps alone."""

    def __init__(self, vectors: dict[str, torch.Tensor], norm_rows: dict[str, torch.Tensor],
                 reading: Sequence[tuple[slice, StepSteering]] = ()):
        self._vectors = vectors  # site -> [M, L, d]
        self._norm_rows = norm_rows  # site -> [M, 1, 1] bool: rows that take the norm-preserving rule
        self._reading = tuple(reading)  # (rows, steering) of the streams whose quality controls read the state

    @classmethod
    def stack(cls, rows: int, entries: Sequence[tuple[slice, StepSteering]]) -> "BatchSteering | None":
        """`entries`: (the batch rows a stream's step steering applies to, that steering)."""
        if not entries:
            return None
        vectors: dict[str, torch.Tensor] = {}
        norm: dict[str, list[bool]] = {}
        for where, step in entries:
            v = step.layers()
            if step.site not in vectors:
                vectors[step.site] = v.new_zeros(rows, *v.shape)
                norm[step.site] = [False] * rows
            vectors[step.site][where] = v
            if step.rule == "norm":
                for r in range(*where.indices(rows)):
                    norm[step.site][r] = True
        norm_rows = {site: torch.tensor(flags, device=vectors[site].device)[:, None, None]
                     for site, flags in norm.items() if any(flags)}
        return cls(vectors, norm_rows, [(where, step) for where, step in entries if step.reads_state])

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._vectors)

    @property
    def reads_state(self) -> bool:
        """True when some row's steering depends on its hidden state (a quality control): a captured step,
        which holds vectors only, cannot run it."""
        return bool(self._reading)

    def at_site(self, site: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(vectors [M, L, d], norm-rule rows [M, 1, 1]) at `site` (None where there are none)."""
        return self._vectors.get(site), self._norm_rows.get(site)

    def steer(self, site: str, layer: int, h: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors.get(site)
        if vectors is None:
            return h
        v = vectors[:, layer, None].to(h.dtype)  # [M, 1, d]
        norm = self._norm_rows.get(site)
        h = h + v if norm is None else torch.where(norm, apply_steering(h, v, "norm"), h + v)
        for where, step in self._reading:
            if step.site == site:
                h[where] = h[where] + step.quality_vector(layer, h[where])
        return h


def apply_steering(h: torch.Tensor, v: torch.Tensor, rule: str) -> torch.Tensor:
    """Apply vector(s) v (broadcast over h [..., d]) to hidden states h.

    "add":  h + v                                    (MusicRFM)
    "norm": (h + ||h|| v) / (1 + ||v||)              norms over the last dim
            With v = alpha r (r unit, alpha = ||v||) this is the activation-steering paper's
            (h + alpha ||h|| r) / (1 + alpha); written in v it stays defined for negative
            coefficients (v along -r). The result's norm is at most ||h||, equal when h is along v.
    """
    if rule == "add":
        return h + v
    if rule == "norm":
        h_norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        v_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        return (h + h_norm * v) / (1 + v_norm)
    raise ValueError(f"unknown steering rule {rule!r}; choose one of {', '.join(RULES)}")
