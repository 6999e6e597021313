"""Direction banks: per-layer concept directions for one model, with arithmetic and a safetensors file.

A `Direction` is one concept class ("notes:C") as one vector per decoder layer, plus a per-layer
validation score (e.g. probe AUC) that layer weighting reads. Directions support control-vector
arithmetic (sum, difference, scaling, orthogonalisation); the results need not be unit vectors.

A `DirectionBank` is the unit that is trained, saved and loaded: directions keyed "concept:class", the
fingerprint of the model they were read from, and how they were made (method, pooling, injection point).
Invariant: every direction in a bank is a unit vector at every layer. The steering strength lives in
the coefficient, never in the stored vector, so eta0 means the same thing for every bank; a bank refuses
non-unit directions (it does not rescale them silently): call `Direction.normalized()` first.

A bank also carries the model's typical activation size at its injection point (`LayerNorms`: mean and
spread of |h| per layer, measured on the extraction's tokens). Relative strength (engine.steering) reads it:
s = 0.3 adds 30 % of each layer's typical norm, on any model. Banks made before it existed load without it;
the engine measures it once with a short unsteered pass (engine.norms).

File format (one .safetensors file, no pickles):
  tensors   "<concept>:<class>/directions" float32 [L, d] and "<concept>:<class>/scores" float32 [L]
  metadata  __metadata__["musicrfm"] = JSON {"format": "musicrfm.direction-bank", "version": 1,
            "fingerprint", "method", "pooling", "score_name", "injection_point",
            "concepts": {concept: [classes]}, "metadata": {...},
            "layer_norms": {"mean": [L], "std": [L], "tokens": N, "source": "..."}}  (optional)
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from musicrfm.protocol import fields

from .decoder import INJECTION_POINTS
from .model import ModelFingerprint

__all__ = [
    "Direction",
    "DirectionBank",
    "Provenance",
    "LayerNorms",
    "BankError",
    "BankFormatError",
    "BankMismatchError",
    "BankNotFoundError",
    "UnknownDirectionError",
    "FORMAT",
    "VERSION",
]

FORMAT = "musicrfm.direction-bank"
VERSION = 1
POOLINGS = ("mean", "last")
UNIT_TOLERANCE = 1e-3
_METADATA_KEY = "musicrfm"


class BankError(ValueError):
    """Base class of every direction-bank error: a bad bank is a bad input, so a ValueError (the command line
    reports it in one line, as it does every ValueError)."""


class BankFormatError(BankError):
    """A bank (a file, or one being built in memory) breaks the format: unreadable, malformed or inconsistent."""


class BankNotFoundError(BankError, FileNotFoundError):
    """The bank file does not exist."""


class BankMismatchError(BankError):
    """A bank does not fit the model (or the other bank) it is used with."""


class UnknownDirectionError(KeyError, BankError):
    """A "concept:class" key that the bank does not hold."""

    def __str__(self) -> str:
        # KeyError's str() would repr() the message (quotes, escaped newlines); show it as written.
        return str(self.args[0]) if self.args else ""


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _split_key(key: object) -> tuple[str, str]:
    """Check a "concept:class" key and split it at the first colon (class names may contain colons)."""
    if not isinstance(key, str):
        raise BankFormatError(f"direction keys are 'concept:class' strings, got {key!r}")
    concept, sep, cls = key.partition(":")
    if not sep or not concept or not cls:
        raise BankFormatError(f"direction key {key!r} is not of the form 'concept:class' (e.g. 'notes:C')")
    if "/" in key:
        # '/' separates the key from the tensor role in the file ("notes:C/directions").
        raise BankFormatError(f"direction key {key!r} must not contain '/'")
    return concept, cls


# --- Direction --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Direction:
    """One direction per decoder layer (`vectors` [L, d]) and the per-layer validation scores [L]."""

    vectors: torch.Tensor
    scores: torch.Tensor
    name: str = ""

    def __post_init__(self) -> None:
        v, s = self.vectors, self.scores
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not v.is_floating_point():
            raise ValueError(f"direction {self.name!r}: vectors must be a float tensor [layers, hidden], "
                             f"got {_describe_value(v)}")
        if not isinstance(s, torch.Tensor) or s.ndim != 1 or s.shape[0] != v.shape[0]:
            raise ValueError(f"direction {self.name!r}: scores must be a tensor [{v.shape[0]}] (one per layer), "
                             f"got {_describe_value(s)}")
        v = v.detach().to(torch.float32)
        s = s.detach().to(torch.float32)
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"direction {self.name!r}: vectors contain NaN or inf")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"direction {self.name!r}: scores contain NaN or inf")
        object.__setattr__(self, "vectors", v)
        object.__setattr__(self, "scores", s)

    @property
    def num_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def norms(self) -> torch.Tensor:
        """Per-layer Euclidean norms [L]."""
        return torch.linalg.vector_norm(self.vectors, dim=1)

    # arithmetic ------------------------------------------------------------------------------------

    def _check_same_shape(self, other: "Direction") -> None:
        if self.vectors.shape != other.vectors.shape:
            raise ValueError(f"shape mismatch: direction {self.name!r} is {_shape(self.vectors)}, "
                             f"direction {other.name!r} is {_shape(other.vectors)}")

    def __add__(self, other: "Direction") -> "Direction":
        if not isinstance(other, Direction):
            return NotImplemented
        self._check_same_shape(other)
        return Direction(self.vectors + other.vectors, (self.scores + other.scores) / 2,
                         f"({self.name} + {other.name})")

    def __sub__(self, other: "Direction") -> "Direction":
        if not isinstance(other, Direction):
            return NotImplemented
        self._check_same_shape(other)
        return Direction(self.vectors - other.vectors, (self.scores + other.scores) / 2,
                         f"({self.name} - {other.name})")

    def __mul__(self, factor: float) -> "Direction":
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        if not math.isfinite(factor):
            raise ValueError(f"cannot scale direction {self.name!r} by {factor!r}: the factor must be finite")
        return Direction(self.vectors * float(factor), self.scores, f"{float(factor):g}*{self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> "Direction":
        return Direction(-self.vectors, self.scores, f"-{self.name}")

    def orthogonalized(self, other: "Direction") -> "Direction":
        """Remove, layer by layer, the component along `other`'s vector (layers where it is zero are kept)."""
        self._check_same_shape(other)
        b = other.vectors
        bb = (b * b).sum(dim=1, keepdim=True)
        coef = (self.vectors * b).sum(dim=1, keepdim=True) / bb.clamp_min(torch.finfo(torch.float32).tiny)
        return Direction(self.vectors - coef * b, self.scores, f"orth({self.name}, {other.name})")

    def normalized(self) -> "Direction":
        """Unit norm at every layer; zero rows stay zero (they have no direction to keep)."""
        n = self.norms().unsqueeze(1).clamp_min(torch.finfo(torch.float32).tiny)
        return Direction(self.vectors / n, self.scores, self.name)

    def cosine(self, other: "Direction") -> torch.Tensor:
        """Per-layer cosine similarity [L]; 0 where either vector is zero."""
        self._check_same_shape(other)
        return F.cosine_similarity(self.vectors, other.vectors, dim=1, eps=1e-12)

    def __repr__(self) -> str:
        return f"Direction({self.name!r}, layers={self.num_layers}, hidden={self.hidden_size})"


def _describe_value(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')} tensor {_shape(x)}"
    return type(x).__name__


# --- DirectionBank ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """How one concept's directions were made: the method that found them and what their per-layer scores
    measure ("auc"; "r2" for a regression such as tempo). A bank's header holds one of each; a merged bank
    whose concepts were made differently reads "mixed" there and keeps each concept's own Provenance under
    metadata["provenance"] (docs/formats.md). The one place that shape is built or read."""

    method: str
    score_name: str = "auc"

    def to_dict(self) -> dict[str, str]:
        return {"method": self.method, "score_name": self.score_name}

    @classmethod
    def from_dict(cls, d: dict) -> "Provenance":
        return cls(str(d["method"]), str(d["score_name"]))



@dataclass(frozen=True)
class LayerNorms:
    """The typical size of the activations a bank's directions are added to: per layer, the mean and standard
    deviation of the per-token norm |h| at the injection point, over `tokens` token positions; `source` says
    where they were measured ("extraction: ..." or "measured: ..."). Relative strength is a fraction
    of `mean`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokens: int
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            try:
                values = tuple(float(fields.number(f"layer_norms.{name}", v)) for v in getattr(self, name))
            except TypeError:
                raise BankFormatError(f"layer_norms.{name} must be a list of numbers") from None
            except ValueError as exc:
                raise BankFormatError(str(exc)) from None
            object.__setattr__(self, name, values)
        if not self.mean or len(self.mean) != len(self.std):
            raise BankFormatError(f"layer_norms: mean and std need one value per layer, got {len(self.mean)} and "
                                  f"{len(self.std)}")
        if min(self.mean) <= 0 or min(self.std) < 0:
            raise BankFormatError(f"layer_norms: means must be > 0 and spreads >= 0, got mean {list(self.mean)}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise BankFormatError(f"layer_norms.tokens must be a whole number >= 1, got {fields.shown(self.tokens)}")
        if not isinstance(self.source, str):
            raise BankFormatError(f"layer_norms.source must be a string, got {fields.shown(self.source)}")

    @property
    def num_layers(self) -> int:
        return len(self.mean)

    def scale(self) -> torch.Tensor:
        """The per-layer norms relative strength multiplies, float32 [L]."""
        return torch.tensor(self.mean, dtype=torch.float32)

    def to_dict(self) -> dict:
        return {"mean": [round(v, 6) for v in self.mean], "std": [round(v, 6) for v in self.std],
                "tokens": self.tokens, "source": self.source}

    @classmethod
    def from_dict(cls, d: object) -> "LayerNorms":
        fields.fields("layer_norms", d, ("mean", "std", "tokens", "source"), error=BankFormatError)
        missing = [k for k in ("mean", "std", "tokens") if k not in d]
        if missing:
            raise BankFormatError(f"layer_norms lacks {', '.join(missing)}")
        return cls(d["mean"], d["std"], d["tokens"], d.get("source", ""))  # __post_init__ checks and makes tuples

    def combined(self, other: "LayerNorms") -> "LayerNorms":
        """Both measurements pooled (weighted by their token counts): two banks of one model, read at one point."""
        if other.num_layers != self.num_layers:
            raise BankMismatchError(f"layer norms for {self.num_layers} and {other.num_layers} layers")
        if other == self:
            return self
        n1, n2 = self.tokens, other.tokens
        mean, std = [], []
        for m1, s1, m2, s2 in zip(self.mean, self.std, other.mean, other.std):
            m = (n1 * m1 + n2 * m2) / (n1 + n2)
            var = (n1 * (s1 ** 2 + m1 ** 2) + n2 * (s2 ** 2 + m2 ** 2)) / (n1 + n2) - m ** 2
            mean.append(m)
            std.append(math.sqrt(max(var, 0.0)))
        source = self.source if self.source == other.source else f"{self.source}; {other.source}"
        return LayerNorms(tuple(mean), tuple(std), n1 + n2, source)


@dataclass(eq=False)
class DirectionBank:
    """Unit directions keyed "concept:class" for one model; see the module docstring for the invariants."""

    directions: dict[str, Direction]
    fingerprint: ModelFingerprint
    method: str
    pooling: str
    score_name: str = "auc"
    injection_point: str = "residual"
    metadata: dict = field(default_factory=dict)
    layer_norms: LayerNorms | None = None  # the activations' typical size (relative strength); None: not measured

    def __post_init__(self) -> None:
        self.validate()
        # The key is the direction's identity in a bank; keep names in step with it.
        self.directions = {k: d if d.name == k else replace(d, name=k) for k, d in self.directions.items()}

    def validate(self) -> None:
        """Check every invariant; raises BankFormatError naming the offending field or direction."""
        if not isinstance(self.fingerprint, ModelFingerprint):
            raise BankFormatError(f"fingerprint must be a ModelFingerprint, got {type(self.fingerprint).__name__}")
        for name in ("method", "score_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise BankFormatError(f"{name} must be a non-empty string, got {value!r}")
        fields.choice("pooling", self.pooling, POOLINGS, error=BankFormatError)
        fields.choice("injection_point", self.injection_point, INJECTION_POINTS, error=BankFormatError)
        if not isinstance(self.metadata, dict):
            raise BankFormatError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BankFormatError(f"metadata must be JSON-serialisable ({exc})") from None
        if self.layer_norms is not None:
            if not isinstance(self.layer_norms, LayerNorms):
                raise BankFormatError(f"layer_norms must be LayerNorms, got {type(self.layer_norms).__name__}")
            if self.layer_norms.num_layers != self.fingerprint.num_layers:
                raise BankFormatError(f"layer_norms has {self.layer_norms.num_layers} layers, the bank is for "
                                      f"{self.fingerprint.describe()}")
        if not isinstance(self.directions, dict):
            raise BankFormatError(f"directions must be a dict of 'concept:class' -> Direction, "
                                  f"got {type(self.directions).__name__}")
        expected = (self.fingerprint.num_layers, self.fingerprint.hidden_size)
        for key, d in self.directions.items():
            _split_key(key)
            if not isinstance(d, Direction):
                raise BankFormatError(f"direction {key!r} must be a Direction, got {type(d).__name__}")
            if tuple(d.vectors.shape) != expected:
                raise BankFormatError(f"direction {key!r} has shape {_shape(d.vectors)}, but the bank is for "
                                      f"{self.fingerprint.describe()} ([{expected[0]}, {expected[1]}])")
            error = (d.norms() - 1).abs()
            worst = int(error.argmax()) if error.numel() else 0
            if error.numel() and float(error[worst]) > UNIT_TOLERANCE:
                raise BankFormatError(
                    f"direction {key!r} is not unit norm at layer {worst} (norm {float(d.norms()[worst]):.4g}): "
                    "bank directions must be unit vectors; use Direction.normalized() first")

    # mapping-like access ---------------------------------------------------------------------------

    @property
    def concepts(self) -> dict[str, list[str]]:
        """concept -> class names, in insertion order."""
        out: dict[str, list[str]] = {}
        for key in self.directions:
            concept, cls = _split_key(key)
            out.setdefault(concept, []).append(cls)
        return out

    def keys(self) -> list[str]:
        return list(self.directions)

    def __len__(self) -> int:
        return len(self.directions)

    def __contains__(self, key: object) -> bool:
        return key in self.directions

    def __getitem__(self, key: str) -> Direction:
        try:
            return self.directions[key]
        except (KeyError, TypeError):
            raise UnknownDirectionError(self._unknown_message(key)) from None

    def _unknown_message(self, key: object) -> str:
        if not self.directions:
            return f"no direction {key!r}: the bank is empty"
        # Case slips ("notes:c") are the commonest typo: offer those first, then spelling neighbours.
        same_case = [k for k in self.keys() if k.casefold() == str(key).casefold()]
        near = same_case + [k for k in difflib.get_close_matches(str(key), self.keys(), n=3, cutoff=0.6)
                            if k not in same_case]
        hint = f"; did you mean {', '.join(repr(k) for k in near[:3])}?" if near else ""
        available = "; ".join(f"{c}: {' '.join(classes)}" for c, classes in self.concepts.items())
        return f"no direction {key!r} in the bank{hint} (available: {available})"

    @property
    def provenance(self) -> dict[str, Provenance]:
        """concept -> how its directions were made: as a mixed merge stored it, else the header's."""
        stored = self.metadata.get("provenance") or {}
        return {c: Provenance.from_dict(stored[c]) if c in stored else Provenance(self.method, self.score_name)
                for c in self.concepts}

    @property
    def chosen_layer(self) -> int:
        """The layer `musicrfm train --layer-choice clustering` chose (metadata["layer_choice"]["layer"]): where
        the linear-probe method steers (`--layers chosen`). A BankFormatError when the bank records none."""
        choice = self.metadata.get("layer_choice")
        layer = choice.get("layer") if isinstance(choice, dict) else None
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.fingerprint.num_layers:
            raise BankFormatError("the bank records no chosen layer (train it with `musicrfm train --layer-choice "
                                  "clustering`; a merge of several banks keeps none)")
        return layer

    def describe(self) -> str:
        counts = ", ".join(f"{c} [{len(v)}]" for c, v in self.concepts.items()) or "no directions"
        return (f"{self.method} directions ({self.pooling} pooling, {self.injection_point}) for "
                f"{self.fingerprint.describe()}: {counts}")

    # compatibility and combination -----------------------------------------------------------------

    def check_compatible(self, fingerprint: ModelFingerprint) -> None:
        """Raise BankMismatchError unless the bank was made for a model with this fingerprint."""
        if fingerprint != self.fingerprint:
            raise BankMismatchError(f"bank is for {self.fingerprint.describe()}, model is {fingerprint.describe()}")

    def merge(self, other: "DirectionBank") -> "DirectionBank":
        """A new bank holding both banks' directions (same model, pooling and injection point; no key in both).

        Banks trained differently still steer together (tempo's R^2-scored bank beside AUC-scored ones): a
        field that differs becomes "mixed", and `metadata["provenance"]` keeps each concept's own."""
        other.check_compatible(self.fingerprint)
        for name in ("pooling", "injection_point"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                # Directions read at another point (or pooled otherwise) steer along another axis.
                raise BankMismatchError(f"cannot merge banks with different {name}: {a!r} and {b!r}")
        duplicates = [k for k in other.directions if k in self.directions]
        if duplicates:
            raise BankMismatchError(f"cannot merge banks: both hold {', '.join(map(repr, duplicates))}")
        if self.metadata == other.metadata:
            metadata = dict(self.metadata)
        else:  # free-form extras cannot be reconciled in general; keep both, losing nothing
            metadata = {"merged_from": [self.metadata, other.metadata]}
        method = self.method if self.method == other.method else "mixed"
        score_name = self.score_name if self.score_name == other.score_name else "mixed"
        if "mixed" in (method, score_name):
            metadata["provenance"] = {concept: p.to_dict() for bank in (self, other)
                                      for concept, p in bank.provenance.items()}
        norms = self.layer_norms or other.layer_norms
        if self.layer_norms is not None and other.layer_norms is not None:
            norms = self.layer_norms.combined(other.layer_norms)
        return DirectionBank({**self.directions, **other.directions}, self.fingerprint, method,
                             self.pooling, score_name, self.injection_point, metadata, norms)

    def with_layer_norms(self, norms: LayerNorms) -> "DirectionBank":
        """The same bank carrying `norms` (checked against its model)."""
        return replace(self, layer_norms=norms)

    @classmethod
    def from_arrays(
        cls,
        concept: str,
        classes: list[str],
        vectors: torch.Tensor,
        scores: torch.Tensor,
        fingerprint: ModelFingerprint,
        method: str,
        pooling: str,
        score_name: str = "auc",
        injection_point: str = "residual",
        metadata: dict | None = None,
        layer_norms: LayerNorms | None = None,
    ) -> "DirectionBank":
        """One concept's bank from stacked arrays: vectors [C, L, d], scores [C, L]; each (class, layer)
        vector is rescaled to unit norm (an all-zero one is an error: it has no direction)."""
        classes = list(classes)
        c, layers, hidden = len(classes), fingerprint.num_layers, fingerprint.hidden_size
        if not isinstance(vectors, torch.Tensor) or tuple(vectors.shape) != (c, layers, hidden):
            raise BankFormatError(f"vectors must be [classes, layers, hidden] = [{c}, {layers}, {hidden}], "
                                  f"got {_describe_value(vectors)}")
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (c, layers):
            raise BankFormatError(f"scores must be [classes, layers] = [{c}, {layers}], got {_describe_value(scores)}")
        if len(set(classes)) != c:
            raise BankFormatError(f"class names repeat: {classes}")
        vectors = vectors.detach().to(torch.float32)
        norms = torch.linalg.vector_norm(vectors, dim=2)
        zero = (norms == 0).nonzero()
        if len(zero):
            ci, layer = (int(x) for x in zero[0])
            raise BankFormatError(f"direction '{concept}:{classes[ci]}' is zero at layer {layer}: cannot normalise it")
        unit = vectors / norms.unsqueeze(2)
        directions = {f"{concept}:{name}": Direction(unit[i].clone(), scores[i].clone(), f"{concept}:{name}")
                      for i, name in enumerate(classes)}
        return cls(directions, fingerprint, method, pooling, score_name, injection_point, dict(metadata or {}),
                   layer_norms)

    # file I/O --------------------------------------------------------------------------------------

    def header(self) -> dict:
        """The JSON document stored under __metadata__["musicrfm"]."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint.to_dict(),
            "method": self.method,
            "pooling": self.pooling,
            "score_name": self.score_name,
            "injection_point": self.injection_point,
            "concepts": self.concepts,
            "metadata": self.metadata,
            **({"layer_norms": self.layer_norms.to_dict()} if self.layer_norms is not None else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank as one .safetensors file (atomically: a reader never sees half a file)."""
        self.validate()  # the dict is mutable: check again what is about to be written
        tensors = {}
        for key, d in self.directions.items():
            # Clones: safetensors refuses tensors that share storage (e.g. slices of one array).
            tensors[f"{key}/directions"] = d.vectors.detach().to("cpu", torch.float32).contiguous().clone()
            tensors[f"{key}/scores"] = d.scores.detach().to("cpu", torch.float32).contiguous().clone()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(self.header())})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DirectionBank":
        """Read and validate a bank file; every problem is a BankError naming the path."""
        path = Path(path)
        if not path.is_file():
            raise BankNotFoundError(f"direction bank {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                stored = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise BankFormatError(f"{path} is not a readable safetensors file ({exc})") from None
        try:
            return cls._from_file_contents(stored, tensors)
        except (BankFormatError, ValueError) as exc:
            raise BankFormatError(f"{path}: {exc}") from None

    @classmethod
    def _from_file_contents(cls, stored: dict, tensors: dict[str, torch.Tensor]) -> "DirectionBank":
        if _METADATA_KEY not in stored:
            raise BankFormatError("a safetensors file, but not a musicrfm direction bank (no 'musicrfm' metadata)")
        try:
            head = json.loads(stored[_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise BankFormatError(f"the 'musicrfm' metadata is not valid JSON ({exc})") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            found = head.get("format") if isinstance(head, dict) else head
            raise BankFormatError(f"format is {found!r}, expected {FORMAT!r}")
        if head.get("version") != VERSION:
            raise BankFormatError(f"bank format version {head.get('version')!r}; this musicrfm reads version {VERSION}")
        missing = [k for k in ("fingerprint", "method", "pooling", "score_name", "injection_point", "concepts")
                   if k not in head]
        if missing:
            raise BankFormatError(f"the header lacks {', '.join(missing)}")
        try:
            fingerprint = ModelFingerprint.from_dict(head["fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BankFormatError(f"bad fingerprint {head['fingerprint']!r} ({exc!r})") from None
        concepts = head["concepts"]
        if not isinstance(concepts, dict) or not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in concepts.values()):
            raise BankFormatError("'concepts' must map each concept to a list of class names")
        layers, hidden = fingerprint.num_layers, fingerprint.hidden_size
        directions: dict[str, Direction] = {}
        used: set[str] = set()
        for concept, classes in concepts.items():
            for name in classes:
                key = f"{concept}:{name}"
                if key in directions:
                    raise BankFormatError(f"direction {key!r} is listed twice in 'concepts'")
                vec_name, score_name = f"{key}/directions", f"{key}/scores"
                for tensor_name, shape in ((vec_name, (layers, hidden)), (score_name, (layers,))):
                    t = tensors.get(tensor_name)
                    if t is None:
                        raise BankFormatError(f"tensor {tensor_name!r} is missing")
                    if t.dtype != torch.float32 or tuple(t.shape) != shape:
                        raise BankFormatError(f"tensor {tensor_name!r} is {_describe_value(t)}, expected float32 "
                                              f"[{', '.join(map(str, shape))}] for {fingerprint.describe()}")
                used.update((vec_name, score_name))
                directions[key] = Direction(tensors[vec_name], tensors[score_name], key)
        extra = sorted(set(tensors) - used)
        if extra:
            raise BankFormatError(f"tensors not listed in 'concepts': {', '.join(extra[:5])}"
                                  + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        metadata = head.get("metadata", {})
        norms = LayerNorms.from_dict(head["layer_norms"]) if head.get("layer_norms") is not None else None
        return cls(directions, fingerprint, head["method"], head["pooling"], head["score_name"],
                   head["injection_point"], metadata, norms)

    def __repr__(self) -> str:
        return f"DirectionBank({self.describe()})"
