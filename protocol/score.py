"""Performance scores: a TOML file of timed cues, compiled to protocol messages (docs/scores.md).

A score compiles to plain `set` messages, each with the `at_step` it applies at, so the same list drives
an offline render (`musicrfm perform score.toml --out perf.wav`) and a live server (`--url`), and both give
the same tokens for the same seed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TOP = ("title", "model", "seconds", "seed", "prompt", "banks", "sampling", "steering", "cue")
_STEERING = ("gate", "gate_seed", "layers", "rows", "rule", "units")
_CUE_KINDS = ("set", "prompt", "direction", "remove", "ramp", "crossfade", "gate", "layers", "sampling")
# The longest performance a score may ask for: a day (a score's length decides how long a render runs and
# how many frames it holds; 1e308 seconds is a typo, not a performance).
MAX_SCORE_SECONDS = 24 * 3600


class ScoreError(ValueError):
    """A score that cannot be played; the text names the file, the cue and the problem."""


@dataclass(frozen=True)
class Cue:
    step: int
    patch: dict  # the `set` message body


@dataclass
class Score:
    path: Path | None
    seconds: float
    seed: int = 0
    prompt: str = ""
    title: str = ""
    model: str | None = None
    banks: list[Path] = field(default_factory=list)
    initial: dict = field(default_factory=dict)  # the `set` body of the starting state (step 0)
    cues: list[Cue] = field(default_factory=list)
    frame_rate: float = 50.0

    @property
    def frames(self) -> int:
        return max(1, round(self.seconds * self.frame_rate))

    def directions(self) -> set[str]:
        keys = set(self.initial.get("directions", {}))
        for cue in self.cues:
            keys |= set(cue.patch.get("directions", {}))
        return keys

    def messages(self) -> list[dict]:
        """Everything to send after a stream is stopped: the initial state, then every cue at its step."""
        out = [{"type": "set", **self.initial}]
        out += [{"type": "set", "at_step": cue.step, **cue.patch} for cue in self.cues]
        return out


def _fail(where: str, text: str) -> ScoreError:
    return ScoreError(f"{where}: {text}")


def _number(where: str, value: Any) -> float:
    return fields.number(where, value, error=ScoreError)


def _table(where: str, value: Any, allowed: tuple[str, ...]) -> dict:
    return fields.fields(where, value, allowed, kind="a table", key="key", error=ScoreError)


def _length(where: str, spec: dict, frame_rate: float) -> int:
    """A duration given as `seconds` or `steps` -> steps (>= 1)."""
    if ("seconds" in spec) == ("steps" in spec):
        raise _fail(where, "give its length as exactly one of seconds = ... or steps = ...")
    if "steps" in spec:
        steps = fields.whole(f"{where} steps", spec["steps"], error=ScoreError)
    else:
        steps = round(_number(f"{where} seconds", spec["seconds"]) * frame_rate)
    if steps < 1:
        raise _fail(where, f"length must be at least one step, got {steps}")
    return steps


def _cue_step(where: str, cue: dict, frame_rate: float) -> int:
    if ("at" in cue) == ("step" in cue):
        raise _fail(where, "needs exactly one of at = SECONDS or step = STEP")
    if "step" in cue:
        return fields.whole(f"{where} step", cue["step"], 0, error=ScoreError)
    at = _number(f"{where} at", cue["at"])
    if at < 0:
        raise _fail(where, f"at must be >= 0 seconds, got {at}")
    return round(at * frame_rate)


def _steering_patch(where: str, table: dict) -> dict:
    patch: dict[str, Any] = {}
    if "gate" in table or "gate_seed" in table:
        patch["gate"] = {}
        if "gate" in table:
            patch["gate"]["p"] = _number(f"{where} gate", table["gate"])
        if "gate_seed" in table:
            patch["gate"]["seed"] = table["gate_seed"]
    for name in ("layers", "rows", "rule", "units"):
        if name in table:
            patch[name] = table[name]
    return patch


def _cue_patch(where: str, cue: dict, frame_rate: float, coefficients: dict[str, float]) -> dict:
    """One cue's `set` body. `coefficients` tracks each direction's strength, for ramps that start from it."""
    patch: dict[str, Any] = {}
    directions: dict[str, Any] = {}
    if "set" in cue:
        patch.update(_table(f"{where} set", cue["set"], ("prompt", "directions", "gate", "layers", "rows", "rule",
                                                         "units", "sampling", "seed")))
        given = patch.pop("directions", {})
        if not isinstance(given, dict):
            raise _fail(where, f"set.directions must be a table of \"concept:class\" = {{...}}, got "
                               f"{fields.shown(given)}")
        directions.update(given)
    if "prompt" in cue:
        if not isinstance(cue["prompt"], str):
            raise _fail(where, f"prompt must be a string, got {fields.shown(cue['prompt'])}")
        patch["prompt"] = cue["prompt"]
    if "direction" in cue:
        d = dict(_table(f"{where} direction", cue["direction"], ("key", "coefficient", "schedule", "active")))
        key = d.pop("key", None)
        if not isinstance(key, str):
            raise _fail(where, "direction needs key = \"concept:class\"")
        directions[key] = d
    if "remove" in cue:
        keys = cue["remove"] if isinstance(cue["remove"], list) else [cue["remove"]]
        for key in keys:
            if not isinstance(key, str):
                raise _fail(where, f"remove names directions (\"concept:class\" or a list of them), got "
                                   f"{fields.shown(key)}")
            directions[key] = None
    if "ramp" in cue:
        r = _table(f"{where} ramp", cue["ramp"], ("direction", "to", "from", "seconds", "steps"))
        key = r.get("direction")
        if not isinstance(key, str):
            raise _fail(where, "ramp needs direction = \"concept:class\"")
        length = _length(f"{where} ramp", r, frame_rate)
        start = _number(f"{where} ramp from", r["from"]) if "from" in r else coefficients.get(key, 0.0)
        end = _number(f"{where} ramp to", r["to"]) if "to" in r else None
        if end is None:
            raise _fail(where, "ramp needs to = COEFFICIENT")
        scale = max(abs(start), abs(end)) or 1.0
        # coefficient x keyframes: the strength goes start -> end over `length` steps, then holds.
        directions[key] = {"coefficient": scale,
                           "schedule": {"kind": "keyframes", "points": [[0, start / scale], [length, end / scale]]}}
    if "crossfade" in cue:
        c = _table(f"{where} crossfade", cue["crossfade"], ("from", "to", "coefficient", "seconds", "steps", "curve"))
        a, b = c.get("from"), c.get("to")
        if not (isinstance(a, str) and isinstance(b, str)) or a == b:
            raise _fail(where, "crossfade needs two different directions: from = \"...\", to = \"...\"")
        length = _length(f"{where} crossfade", c, frame_rate)
        coefficient = _number(f"{where} crossfade coefficient", c.get("coefficient", coefficients.get(a, 0.0)))
        curve = c.get("curve", "equal_power")
        directions[a] = {"coefficient": coefficient, "schedule": {"kind": "fade_out", "start": 0, "length": length,
                                                                  "curve": curve}}
        directions[b] = {"coefficient": coefficient, "schedule": {"kind": "fade_in", "start": 0, "length": length,
                                                                  "curve": curve}}
    if "gate" in cue:
        patch.setdefault("gate", {})["p"] = _number(f"{where} gate", cue["gate"])
    if "layers" in cue:
        patch["layers"] = cue["layers"]
    if "sampling" in cue:
        patch["sampling"] = dict(_table(f"{where} sampling", cue["sampling"],
                                        ("guidance_scale", "temperature", "top_k", "top_p", "greedy")))
    if directions:
        patch["directions"] = directions
    for key, value in directions.items():  # remember strengths for later ramps
        if value is None:
            coefficients.pop(key, None)
        elif isinstance(value, dict) and "coefficient" in value:
            coefficients[key] = _number(f"{where} {key} coefficient", value["coefficient"])
    if not patch:
        raise _fail(where, f"does nothing: give one of {', '.join(_CUE_KINDS)}")
    return patch


def parse_score(data: dict, *, frame_rate: float = 50.0, path: Path | None = None) -> Score:
    name = str(path) if path else "score"
    data = _table(name, data, _TOP)
    if "seconds" not in data:
        raise _fail(name, "needs seconds = LENGTH (how long the performance lasts)")
    seconds = _number(f"{name} seconds", data["seconds"])
    if not 0 < seconds <= MAX_SCORE_SECONDS:
        raise _fail(name, f"seconds must be > 0 and at most {MAX_SCORE_SECONDS} (a day), got {seconds:g}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _fail(name, f"model must be a model name (a string), got {fields.shown(model)}")
    title = data.get("title", "")
    if not isinstance(title, str):
        raise _fail(name, f"title must be a string, got {fields.shown(title)}")
    seed = fields.whole(f"{name} seed", data.get("seed", 0), 0, error=ScoreError)
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise _fail(name, f"prompt must be a string, got {fields.shown(prompt)}")
    base = path.parent if path else Path(".")
    banks = data.get("banks", [])
    if not isinstance(banks, list) or not all(isinstance(b, str) for b in banks):
        raise _fail(name, "banks must be a list of file names")
    initial: dict[str, Any] = {"prompt": prompt, "seed": seed}
    if "sampling" in data:
        initial["sampling"] = dict(_table(f"{name} [sampling]", data["sampling"],
                                          ("guidance_scale", "temperature", "top_k", "top_p", "greedy")))
    if "steering" in data:
        initial.update(_steering_patch(f"{name} [steering]", _table(f"{name} [steering]", data["steering"], _STEERING)))
    cues_raw = data.get("cue", [])
    if not isinstance(cues_raw, list):
        raise _fail(name, "cues are written [[cue]] tables")
    coefficients: dict[str, float] = {}
    cues = []
    timed = []
    for i, cue in enumerate(cues_raw):
        where = f"{name} cue {i + 1}"
        cue = _table(where, cue, ("at", "step", *_CUE_KINDS))
        timed.append((_cue_step(where, cue, frame_rate), i, where, cue))
    for step, _, where, cue in sorted(timed, key=lambda t: (t[0], t[1])):  # stable: same step keeps file order
        cues.append(Cue(step, _cue_patch(where, cue, frame_rate, coefficients)))
    score = Score(path, seconds, seed, prompt, title, model,
                  [(base / b) for b in banks], initial, cues, frame_rate)
    late = [c for c in cues if c.step > score.frames]
    if late:
        raise _fail(name, f"a cue at step {late[0].step} comes after the end ({score.frames} frames)")
    return score


def load_score(path: str | Path, *, frame_rate: float = 50.0) -> Score:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScoreError(f"score {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ScoreError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:  # the TOML reader recurses once per nested array or table
        raise ScoreError(f"{path}: arrays or tables nested too deeply") from None
    return parse_score(data, frame_rate=frame_rate, path=path)
