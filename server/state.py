"""The live control state of a session, and the `set` patches that change it (docs/protocol.md).

`ControlState` is immutable: a patch makes a new state, validated as a whole before it is used, so a bad
message changes nothing. `to_spec()` turns the state into the engine's `SteeringSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from musicrfm.engine.sampling import SamplingConfig
from musicrfm.engine.steering import DirectionControl, LayerWeighting, Schedule, SteeringSpec, ROWS, RULES

from musicrfm.protocol.wire import ProtocolError

PLAYBACK = ("stopped", "playing", "paused")
TRANSPORT_COMMANDS = ("play", "pause", "stop", "reset")
_PATCH_FIELDS = ("prompt", "directions", "gate", "layers", "rows", "rule", "sampling", "seed")
_DIRECTION_FIELDS = ("coefficient", "schedule", "active")
_SAMPLING_FIELDS = ("guidance_scale", "temperature", "top_k", "top_p", "greedy")
MAX_PROMPT_CHARS = 2000
MAX_DIRECTIONS = 64
# Finite is not enough: a value the engine turns into inf / NaN (a coefficient of 1e30, a temperature of 1e-300,
# a guidance scale of 1e308, ...) would stop the stream for every listener. So the strength a direction adds
# (|coefficient|, its schedule's peak, the layer weights, and their products) is bounded, and so is sampling.
MAX_STRENGTH = 1000.0
MAX_GUIDANCE_SCALE = 1000.0
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
MIN_SINE_PERIOD = 1.0


@dataclass(frozen=True)
class ControlState:
    prompt: str = ""
    directions: Mapping[str, DirectionControl] = field(default_factory=dict)  # key -> control, in order added
    gate_p: float = 1.0
    gate_seed: int = 0
    layers: LayerWeighting = field(default_factory=LayerWeighting)
    rows: str = "both"
    rule: str = "add"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    playback: str = "stopped"

    def to_spec(self, site: str = "residual") -> SteeringSpec:
        return SteeringSpec(controls=tuple(self.directions.values()), gate_p=self.gate_p, gate_seed=self.gate_seed,
                            layers=self.layers, rows=self.rows, rule=self.rule, site=site)

    def to_dict(self) -> dict:
        return {
            "playback": self.playback,
            "prompt": self.prompt,
            "directions": {k: {"coefficient": c.coefficient, "schedule": c.schedule.to_dict(), "active": c.active}
                           for k, c in self.directions.items()},
            "gate": {"p": self.gate_p, "seed": self.gate_seed},
            "layers": self.layers.to_dict(),
            "rows": self.rows,
            "rule": self.rule,
            "sampling": self.sampling.to_dict(),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict, known_keys: Iterable[str] | None = None) -> "ControlState":
        """The inverse of to_dict (a recording's log holds these); schedules are already absolute."""
        if not isinstance(d, dict):
            raise ProtocolError(f"a control state must be an object, got {type(d).__name__}")
        playback = d.get("playback", "stopped")
        if playback not in PLAYBACK:
            raise ProtocolError(f"playback must be one of {', '.join(PLAYBACK)}, got {playback!r}")
        body = {k: v for k, v in d.items() if k != "playback"}
        return apply_patch(cls(playback=playback), body, step=0, known_keys=known_keys)


def _number(where: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    try:  # math.isfinite raises OverflowError for an integer beyond the float range (JSON allows 1e400 as 1000...0)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        ok = False
    if not ok:
        raise ProtocolError(f"{where} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError(f"{where} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _integer(where: str, value: Any, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{where} must be a whole number in [{lo}, {hi}], got {value!r}")
    return value


def _object(where: str, value: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object, got {value!r}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ProtocolError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return value


def _schedule(where: str, value: Any, step: int) -> Schedule:
    """A schedule from a `set`: relative to the step it applies at, so shifted onto the absolute clock."""
    try:
        schedule = Schedule.parse(value) if isinstance(value, str) else Schedule.from_dict(value)
        if schedule.kind == "sine" and schedule.period < MIN_SINE_PERIOD:  # 2 pi t / period would overflow
            raise ValueError(f"sine schedule: period must be at least {MIN_SINE_PERIOD:g} step, got {schedule.period}")
        return schedule.shifted(step)
    except (ValueError, TypeError, ArithmeticError) as exc:  # ArithmeticError: an integer too large for a float
        raise ProtocolError(f"{where}: {exc}") from None


def _direction(key: str, old: DirectionControl | None, patch: Any, step: int,
               known_keys: frozenset[str] | None) -> DirectionControl:
    where = f"direction {key!r}"
    patch = _object(where, patch, _DIRECTION_FIELDS)
    if known_keys is not None and key not in known_keys:
        import difflib

        near = difflib.get_close_matches(key, sorted(known_keys), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; the banks hold {', '.join(sorted(known_keys)[:12])}"
        raise ProtocolError(f"unknown direction {key!r}{hint}")
    if old is None and "coefficient" not in patch:
        raise ProtocolError(f"{where} is new: it needs a 'coefficient'")
    coefficient = _number(f"{where} coefficient", patch["coefficient"]) if "coefficient" in patch else old.coefficient
    schedule = _schedule(f"{where} schedule", patch["schedule"], step) if "schedule" in patch else (
        old.schedule if old is not None else Schedule())
    active = patch.get("active", old.active if old is not None else True)
    if not isinstance(active, bool):
        raise ProtocolError(f"{where} active must be true or false, got {active!r}")
    try:
        return DirectionControl(key, coefficient, schedule, active)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def apply_patch(state: ControlState, patch: Mapping[str, Any], *, step: int,
                known_keys: Iterable[str] | None = None) -> ControlState:
    """The state after a `set` message's fields (without 'type', 'id', 'at_step'), applied at `step`.
    Raises ProtocolError naming the first problem; the old state is untouched either way."""
    unknown = [k for k in patch if k not in _PATCH_FIELDS]
    if unknown:
        raise ProtocolError(f"set: unknown field {unknown[0]!r}; allowed: {', '.join(_PATCH_FIELDS)}")
    keys = frozenset(known_keys) if known_keys is not None else None
    changes: dict[str, Any] = {}
    if "prompt" in patch:
        prompt = patch["prompt"]
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise ProtocolError(f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
        try:  # JSON can carry lone surrogates (a "\ud800" escape): the tokenizer, msgpack and OSC cannot encode them
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("prompt must be valid Unicode text (it holds a lone surrogate)") from None
        changes["prompt"] = prompt
    if "directions" in patch:
        given = patch["directions"]
        if not isinstance(given, dict):
            raise ProtocolError(f"directions must be an object of key -> settings (or null), got {given!r}")
        directions = dict(state.directions)
        for key, value in given.items():
            if not isinstance(key, str):
                raise ProtocolError(f"direction keys must be strings, got {key!r}")
            if value is None:
                if key not in directions:
                    raise ProtocolError(f"cannot remove direction {key!r}: it is not set")
                del directions[key]
            else:
                directions[key] = _direction(key, directions.get(key), value, step, keys)
        if len(directions) > MAX_DIRECTIONS:
            raise ProtocolError(f"at most {MAX_DIRECTIONS} directions at once")
        changes["directions"] = directions
    if "gate" in patch:
        gate = _object("gate", patch["gate"], ("p", "seed"))
        if "p" in gate:
            changes["gate_p"] = _number("gate p", gate["p"], 0.0, 1.0)
        if "seed" in gate:
            changes["gate_seed"] = _integer("gate seed", gate["seed"], 0, 2**64 - 1)
    if "layers" in patch:
        value = patch["layers"]
        try:
            changes["layers"] = LayerWeighting.parse(value) if isinstance(value, str) else LayerWeighting.from_dict(value)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise ProtocolError(f"layers: {exc}") from None
    for name, options in (("rows", ROWS), ("rule", RULES)):
        if name in patch:
            if patch[name] not in options:
                raise ProtocolError(f"{name} must be one of {', '.join(options)}, got {patch[name]!r}")
            changes[name] = patch[name]
    if "sampling" in patch:
        given = _object("sampling", patch["sampling"], _SAMPLING_FIELDS)
        merged = {**state.sampling.to_dict(), **given}
        for name in ("guidance_scale", "temperature", "top_p"):
            merged[name] = _number(f"sampling {name}", merged[name])
        merged["top_k"] = _integer("sampling top_k", merged["top_k"], 0, 1 << 20)
        if not isinstance(merged["greedy"], bool):
            raise ProtocolError(f"sampling greedy must be true or false, got {merged['greedy']!r}")
        if not 0 <= merged["guidance_scale"] <= MAX_GUIDANCE_SCALE:
            raise ProtocolError(f"sampling guidance_scale must be in [0, {MAX_GUIDANCE_SCALE:g}], "
                                f"got {merged['guidance_scale']}")
        if not merged["greedy"] and merged["temperature"] < MIN_TEMPERATURE:
            raise ProtocolError(f"sampling temperature must be at least {MIN_TEMPERATURE:g} (or set greedy), "
                                f"got {merged['temperature']}")
        if 0 < merged["top_p"] < MIN_TOP_P:
            raise ProtocolError(f"sampling top_p must be 0 (off) or in [{MIN_TOP_P:g}, 1], got {merged['top_p']}")
        try:
            changes["sampling"] = SamplingConfig(**merged)
        except ValueError as exc:
            raise ProtocolError(f"sampling: {exc}") from None
    if "seed" in patch:
        changes["seed"] = _integer("seed", patch["seed"], 0, 2**63 - 1)
    new = replace(state, **changes)
    try:
        new.to_spec()  # the engine's own checks, once more, on the whole
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    _check_strength(new)
    _check_integers(new)
    return new


def _check_integers(state: ControlState) -> None:
    """Every whole number in the state fits in 64 bits: a schedule's `length` of 10**400 is valid JSON, but the
    state is sent to msgpack clients too, and msgpack (like most JSON readers) cannot carry it."""
    todo: list[tuple[str, Any]] = [("state", state.to_dict())]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{where}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
            raise ProtocolError(f"{where.removeprefix('state.')}: {value} does not fit in 64 bits")


def _check_strength(state: ControlState) -> None:
    """Each factor of what a direction adds at a layer (|coefficient|, the schedule's peak, the layer
    weight) and their products stay within MAX_STRENGTH, so the engine never overflows to inf / NaN."""
    layers = state.layers
    weight = abs(layers.w0) * (max(abs(w) for w in layers.layer_weights) if layers.mode == "explicit" else 1.0)
    if not weight <= MAX_STRENGTH:
        raise ProtocolError(f"layers: the layer weights reach {weight:g}; at most {MAX_STRENGTH:g}")
    for key, control in state.directions.items():
        schedule = control.schedule
        peak = max(abs(v) for _, v in schedule.points) if schedule.kind == "keyframes" else 1.0
        coefficient = abs(control.coefficient)
        # `not x <= limit` also refuses NaN (inf * 0 in a product).
        if any(not x <= MAX_STRENGTH for x in (coefficient, peak, weight, coefficient * peak,
                                               coefficient * peak * weight)):
            raise ProtocolError(f"direction {key!r}: too strong (|coefficient| {coefficient:g}, schedule peak "
                                f"{peak:g}, layer weight {weight:g}): each, and their product, must be at most "
                                f"{MAX_STRENGTH:g}")
