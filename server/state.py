"""The live control state of a session, and the `set` patches that change it (docs/protocol.md).

`ControlState` is immutable: a patch makes a new state, validated as a whole before it is used, so a bad
message changes nothing. Its steering part is the engine's `SteeringSpec` itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from musicrfm.engine.sampling import SamplingConfig
from musicrfm.engine.steering import DirectionControl, LayerWeighting, Schedule, SteeringSpec

from musicrfm.protocol import fields
from musicrfm.protocol.wire import ProtocolError

PLAYBACK = ("stopped", "playing", "paused")
TRANSPORT_COMMANDS = ("play", "pause", "stop", "reset")
_PATCH_FIELDS = ("prompt", "directions", "gate", "layers", "rows", "rule", "units", "sampling", "seed")
_DIRECTION_FIELDS = ("coefficient", "schedule", "active")
_SAMPLING_FIELDS = ("guidance_scale", "temperature", "top_k", "top_p", "greedy")
MAX_PROMPT_CHARS = 2000
MAX_DIRECTIONS = 64
MAX_DIRECTION_KEY_CHARS = 128  # a bank's keys are short; a longer one is refused before it is looked up
# Valid but costly: every change's whole state is checked, broadcast to every client and kept for recordings, so
# a schedule's keyframes and the state as a whole are bounded (16 directions x 10,000 points once blocked the
# event loop for 2 s and made each change a 1.7 MB broadcast).
MAX_SCHEDULE_POINTS = 64
MAX_STATE_BYTES = 32 * 1024  # the state as compact (ASCII-escaped) JSON: what every `state` message carries
# Finite is not enough: a value the engine turns into inf / NaN (a coefficient of 1e30, a temperature of 1e-300,
# a guidance scale of 1e308, ...) would stop the stream for every listener. So the strength a direction adds
# (|coefficient|, its schedule's peak, the layer weights, and their products) is bounded, and so is sampling.
MAX_STRENGTH = 1000.0
MAX_GUIDANCE_SCALE = 1000.0
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
MIN_SINE_PERIOD = 1.0
MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class ControlState:
    """Everything a session's controls set. The steering part is the engine's own `SteeringSpec` (its
    directions, gate, layer weighting, rows and rule; its site is the bank's, so the stream sets it when it
    compiles a plan), so what the protocol sets is what the engine runs."""

    prompt: str = ""
    steering: SteeringSpec = field(default_factory=SteeringSpec)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    playback: str = "stopped"

    @property
    def directions(self) -> dict[str, DirectionControl]:
        """key -> control, in the order they were added."""
        return {c.key: c for c in self.steering.controls}

    def to_dict(self) -> dict:
        spec = self.steering
        return {
            "playback": self.playback,
            "prompt": self.prompt,
            "directions": {c.key: {"coefficient": c.coefficient, "schedule": c.schedule.to_dict(), "active": c.active}
                           for c in spec.controls},
            "gate": {"p": spec.gate_p, "seed": spec.gate_seed},
            "layers": spec.layers.to_dict(),
            "rows": spec.rows,
            "rule": spec.rule,
            "units": spec.units,
            "sampling": self.sampling.to_dict(),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict, known_keys: Iterable[str] | None = None) -> "ControlState":
        """The inverse of to_dict (a recording's log holds these); schedules are already absolute."""
        if not isinstance(d, dict):
            raise ProtocolError(f"a control state must be an object, got {type(d).__name__}")
        playback = fields.choice("playback", d.get("playback", "stopped"), PLAYBACK, error=ProtocolError)
        body = {k: v for k, v in d.items() if k != "playback"}
        return apply_patch(cls(playback=playback), body, step=0, known_keys=known_keys)


def _schedule(where: str, value: Any, step: int) -> Schedule:
    """A schedule from a `set`: relative to the step it applies at, so shifted onto the absolute clock."""
    check_schedule_points(where, value)
    try:
        schedule = Schedule.parse(value) if isinstance(value, str) else Schedule.from_dict(value)
        if schedule.kind == "sine" and schedule.period < MIN_SINE_PERIOD:  # 2 pi t / period would overflow
            raise ValueError(f"sine schedule: period must be at least {MIN_SINE_PERIOD:g} step, got {schedule.period}")
        return schedule.shifted(step)
    except (ValueError, TypeError, ArithmeticError) as exc:  # ArithmeticError: an integer too large for a float
        raise ProtocolError(f"{where}: {exc}") from None


def check_schedule_points(where: str, value: Any) -> None:
    """Refuse a keyframe schedule of more than MAX_SCHEDULE_POINTS points before it is parsed (counting is
    cheap; parsing and checking 10,000 points is not)."""
    if isinstance(value, str):
        points = value.count(",") + 1 if value.lstrip().startswith("keyframes") else 0
    elif isinstance(value, dict) and isinstance(value.get("points"), (list, tuple)):
        points = len(value["points"])
    else:
        return
    if points > MAX_SCHEDULE_POINTS:
        raise ProtocolError(f"{where}: at most {MAX_SCHEDULE_POINTS} keyframe points, got {points}")


def _direction(key: str, old: DirectionControl | None, patch: Any, step: int,
               known_keys: frozenset[str] | None) -> DirectionControl:
    """One direction's settings merged into its control. The values themselves (coefficient, active) are
    checked once, by DirectionControl."""
    where = f"direction {fields.shown(key)}"
    patch = fields.fields(where, patch, _DIRECTION_FIELDS, error=ProtocolError)
    if known_keys is not None and key not in known_keys:
        import difflib

        near = difflib.get_close_matches(key, sorted(known_keys), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; the banks hold {', '.join(sorted(known_keys)[:12])}"
        raise ProtocolError(f"unknown direction {fields.shown(key)}{hint}")
    if old is None and "coefficient" not in patch:
        raise ProtocolError(f"{where} is new: it needs a 'coefficient'")
    schedule = _schedule(f"{where} schedule", patch["schedule"], step) if "schedule" in patch else (
        old.schedule if old is not None else Schedule())
    coefficient = patch["coefficient"] if "coefficient" in patch else old.coefficient
    active = patch.get("active", old.active if old is not None else True)
    try:
        return DirectionControl(key, coefficient, schedule, active)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _sampling(old: SamplingConfig, given: Any) -> SamplingConfig:
    """The sampling settings merged with `given`: SamplingConfig checks each value, then the protocol's
    bounds keep the engine away from inf / NaN."""
    given = fields.fields("sampling", given, _SAMPLING_FIELDS, error=ProtocolError)
    try:
        new = SamplingConfig(**{**old.to_dict(), **given})
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    fields.whole("sampling top_k", new.top_k, 0, MAX_TOP_K, error=ProtocolError)
    if not new.guidance_scale <= MAX_GUIDANCE_SCALE:
        raise ProtocolError(f"sampling guidance_scale must be in [0, {MAX_GUIDANCE_SCALE:g}], got {new.guidance_scale}")
    if not new.greedy and new.temperature < MIN_TEMPERATURE:
        raise ProtocolError(f"sampling temperature must be at least {MIN_TEMPERATURE:g} (or set greedy), "
                            f"got {new.temperature}")
    if 0 < new.top_p < MIN_TOP_P:
        raise ProtocolError(f"sampling top_p must be 0 (off) or in [{MIN_TOP_P:g}, 1], got {new.top_p}")
    return new


def apply_patch(state: ControlState, patch: Mapping[str, Any], *, step: int,
                known_keys: Iterable[str] | None = None) -> ControlState:
    """The state after a `set` message's fields (without 'type', 'id', 'at_step'), applied at `step`.
    Raises ProtocolError naming the first problem; the old state is untouched either way.

    Each value is checked once, by the engine type that holds it (DirectionControl, Schedule, LayerWeighting,
    SteeringSpec, SamplingConfig); this adds what only the protocol asks: the message's shape, known direction
    keys, and bounds that keep a live stream finite and every number sendable."""
    fields.fields("set", patch, _PATCH_FIELDS, error=ProtocolError)
    keys = frozenset(known_keys) if known_keys is not None else None
    changes: dict[str, Any] = {}
    steering: dict[str, Any] = {}
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
            raise ProtocolError(f"directions must be an object of key -> settings (or null), "
                                f"got {fields.shown(given)}")
        if len(given) > MAX_DIRECTIONS:
            raise ProtocolError(f"at most {MAX_DIRECTIONS} directions at once, got {len(given)} in one message")
        directions = state.directions
        for key, value in given.items():
            if not isinstance(key, str):
                raise ProtocolError(f"direction keys must be strings, got {type(key).__name__}")
            if len(key) > MAX_DIRECTION_KEY_CHARS:
                raise ProtocolError(f"direction key {fields.shown(key)} is too long (at most {MAX_DIRECTION_KEY_CHARS} "
                                    "characters)")
            if value is None:
                if key not in directions:
                    raise ProtocolError(f"cannot remove direction {fields.shown(key)}: it is not set")
                del directions[key]
            else:
                directions[key] = _direction(key, directions.get(key), value, step, keys)
        if len(directions) > MAX_DIRECTIONS:
            raise ProtocolError(f"at most {MAX_DIRECTIONS} directions at once")
        steering["controls"] = tuple(directions.values())
    if "gate" in patch:
        gate = fields.fields("gate", patch["gate"], ("p", "seed"), error=ProtocolError)
        if "p" in gate:
            steering["gate_p"] = gate["p"]
        if "seed" in gate:
            steering["gate_seed"] = gate["seed"]
    if "layers" in patch:
        value = patch["layers"]
        try:
            steering["layers"] = LayerWeighting.parse(value) if isinstance(value, str) else LayerWeighting.from_dict(value)
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise ProtocolError(f"layers: {exc}") from None
    for name in ("rows", "rule", "units"):
        if name in patch:
            steering[name] = patch[name]
    if steering:
        try:
            changes["steering"] = replace(state.steering, **steering)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
    if "sampling" in patch:
        changes["sampling"] = _sampling(state.sampling, patch["sampling"])
    if "seed" in patch:
        changes["seed"] = fields.whole("seed", patch["seed"], 0, 2**63 - 1, error=ProtocolError)
    new = replace(state, **changes)
    _check_strength(new)
    as_dict = new.to_dict()
    # Only what the patch set can hold a number beyond 64 bits: the rest of the state was checked when it was set.
    given = patch.get("directions")
    _check_integers({"directions": {k: as_dict["directions"][k] for k in given if k in as_dict["directions"]}
                     if isinstance(given, dict) else {},
                     **{name: as_dict[name] for name in patch if name != "directions"}})
    size = len(json.dumps(as_dict, separators=(",", ":")))
    if size > MAX_STATE_BYTES:
        raise ProtocolError(f"the state would be {size} bytes of JSON (at most {MAX_STATE_BYTES}): fewer directions, "
                            "keyframe points or a shorter prompt")
    return new


def _check_integers(state: dict) -> None:
    """Every whole number in the state fits in 64 bits: a schedule's `length` of 10**400 is valid JSON, but the
    state is sent to msgpack clients too, and msgpack (like most JSON readers) cannot carry it. (The walk names
    nothing until it finds a bad number, then finds where it is: building every value's path cost more than
    the rest of a change's checks.)"""
    todo: list[Any] = [state]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, int) and not -2**63 <= value < 2**64:  # (a bool is an int in range)
            raise ProtocolError(f"{_where(state, value).removeprefix('state.')}: {value} does not fit in 64 bits")


def _where(node: Any, target: Any, where: str = "state") -> str:
    """The path of `target` (the very object) in `node`, as 'state.directions.notes:C.schedule.length'."""
    if node is target:
        return where
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = _where(v, target, f"{where}.{k}" if isinstance(node, dict) else f"{where}[{k}]")
        if found:
            return found
    return ""


def _check_strength(state: ControlState) -> None:
    """Each factor of what a direction adds at a layer (|coefficient|, the schedule's peak, the layer
    weight) and their products stay within MAX_STRENGTH, so the engine never overflows to inf / NaN."""
    layers = state.steering.layers
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
            raise ProtocolError(f"direction {fields.shown(key)}: too strong (|coefficient| {coefficient:g}, schedule "
                                f"peak {peak:g}, layer weight {weight:g}): each, and their product, must be at most "
                                f"{MAX_STRENGTH:g}")
