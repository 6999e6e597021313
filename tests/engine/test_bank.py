"""Direction banks: construction invariants, arithmetic, the safetensors file and its validation."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from musicrfm.engine.bank import (
    BankError,
    BankFormatError,
    BankMismatchError,
    BankNotFoundError,
    Direction,
    DirectionBank,
    LayerNorms,
    Provenance,
    UnknownDirectionError,
)
from musicrfm.engine.model import ModelFingerprint

L, D = 4, 8
FP = ModelFingerprint("musicgen", L, D)


def make_bank(concept="notes", classes=("C", "D", "E"), seed=0, **kwargs) -> DirectionBank:
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(classes), L, D, generator=g)
    scores = torch.rand(len(classes), L, generator=g)
    kwargs.setdefault("method", "rfm")
    kwargs.setdefault("pooling", "mean")
    return DirectionBank.from_arrays(concept, list(classes), vectors, scores, FP, **kwargs)


def make_direction(seed, name="x", shape=(L, D)) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(*shape, generator=g), torch.rand(shape[0], generator=g), name)


# --- construction ------------------------------------------------------------------------------------


def test_from_arrays_normalises_each_class_and_layer():
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, L, D, generator=g) * 5
    scores = torch.rand(2, L, generator=g)
    bank = DirectionBank.from_arrays("chords", ["major", "minor"], raw, scores, FP, "rfm", "mean")
    minor = bank["chords:minor"]
    assert torch.allclose(minor.norms(), torch.ones(L))
    assert torch.allclose(minor.vectors, raw[1] / raw[1].norm(dim=1, keepdim=True))
    assert torch.equal(minor.scores, scores[1])
    assert minor.name == "chords:minor"
    assert bank.concepts == {"chords": ["major", "minor"]}


def test_from_arrays_rejects_zero_vectors_and_wrong_shapes():
    vectors = torch.randn(2, L, D)
    vectors[1, 2] = 0
    with pytest.raises(BankFormatError, match=r"'notes:D' is zero at layer 2"):
        DirectionBank.from_arrays("notes", ["C", "D"], vectors, torch.rand(2, L), FP, "rfm", "mean")
    with pytest.raises(BankFormatError, match=r"\[2, 4, 8\].*\[2, 4, 9\]"):
        DirectionBank.from_arrays("notes", ["C", "D"], torch.randn(2, L, 9), torch.rand(2, L), FP, "rfm", "mean")


def test_bank_refuses_non_unit_directions_instead_of_rescaling():
    d = make_direction(1)
    with pytest.raises(BankFormatError, match="not unit norm.*normalized"):
        DirectionBank({"notes:C": d}, FP, "rfm", "mean")
    bank = DirectionBank({"notes:C": d.normalized()}, FP, "rfm", "mean")
    assert bank["notes:C"].name == "notes:C"  # renamed to its key


@pytest.mark.parametrize("field,value,message", [
    ("pooling", "max", "pooling must be one of mean, last"),
    ("injection_point", "mlp", "injection_point must be one of residual, attention"),
    ("metadata", {"x": float("nan")}, "JSON"),
])
def test_bank_validates_its_fields(field, value, message):
    kwargs = {"method": "rfm", "pooling": "mean", field: value}
    with pytest.raises(BankFormatError, match=message):
        DirectionBank({}, FP, **kwargs)


def test_bank_rejects_bad_keys_and_wrong_shapes():
    unit = make_direction(0).normalized()
    with pytest.raises(BankFormatError, match="concept:class"):
        DirectionBank({"notes": unit}, FP, "rfm", "mean")
    wide = make_direction(0, shape=(L, 16)).normalized()
    with pytest.raises(BankFormatError, match=r"\[4, 16\].*4 layers x hidden size 8"):
        DirectionBank({"notes:C": wide}, FP, "rfm", "mean")


def test_mapping_access():
    bank = make_bank().merge(make_bank("chords", ("major", "minor"), seed=1))
    assert bank.keys() == ["notes:C", "notes:D", "notes:E", "chords:major", "chords:minor"]
    assert bank.concepts == {"notes": ["C", "D", "E"], "chords": ["major", "minor"]}
    assert "chords:minor" in bank and "chords:dim" not in bank
    assert len(bank) == 5


def test_unknown_key_lists_near_matches_and_available_keys():
    bank = make_bank()
    with pytest.raises(UnknownDirectionError) as info:
        bank["notes:c"]
    message = str(info.value)
    assert message.startswith("no direction 'notes:c'")  # shown as written, not repr()-quoted by KeyError
    assert "did you mean 'notes:C'" in message
    assert "notes: C D E" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, BankError)


# --- compatibility and merging ------------------------------------------------------------------------


def test_check_compatible_names_both_shapes():
    bank = make_bank()
    bank.check_compatible(ModelFingerprint("musicgen", L, D))
    with pytest.raises(BankMismatchError) as info:
        bank.check_compatible(ModelFingerprint("musicgen", 24, 1024))
    assert str(info.value) == ("bank is for musicgen with 4 layers x hidden size 8, "
                               "model is musicgen with 24 layers x hidden size 1024")


def test_merge_combines_and_refuses_conflicts(tmp_path):
    notes = make_bank(metadata={"source": "a"})
    chords = make_bank("chords", ("major",), seed=1, metadata={"source": "b"})
    merged = notes.merge(chords)
    assert torch.equal(merged["chords:major"].vectors, chords["chords:major"].vectors)
    assert merged.metadata == {"merged_from": [{"source": "a"}, {"source": "b"}]}
    with pytest.raises(BankMismatchError, match="'notes:C'"):
        notes.merge(make_bank(classes=("C",), seed=2))
    with pytest.raises(BankMismatchError, match="injection_point: 'residual' and 'attention'"):
        notes.merge(make_bank("chords", ("major",), injection_point="attention"))
    with pytest.raises(BankMismatchError, match="pooling: 'mean' and 'last'"):
        notes.merge(make_bank("chords", ("major",), pooling="last"))
    # Banks trained differently still steer together; each concept keeps its provenance, and a saved
    # merged bank loads back with it.
    tempos = make_bank("tempos", ("faster",), method="rfm", score_name="r2")
    linear = make_bank("chords", ("major",), method="linear")
    mixed = notes.merge(tempos).merge(linear)
    assert (mixed.method, mixed.score_name) == ("mixed", "mixed")
    assert mixed.metadata["provenance"] == {"notes": {"method": "rfm", "score_name": "auc"},
                                            "tempos": {"method": "rfm", "score_name": "r2"},
                                            "chords": {"method": "linear", "score_name": "auc"}}
    assert set(mixed.keys()) == {"notes:C", "notes:D", "notes:E", "tempos:faster", "chords:major"}
    mixed.save(tmp_path / "mixed.safetensors")
    again = DirectionBank.load(tmp_path / "mixed.safetensors")
    assert again.metadata["provenance"] == mixed.metadata["provenance"] and again.score_name == "mixed"
    # Every bank answers "how was this concept made?" the same way, merged or not.
    assert again.provenance == {"notes": Provenance("rfm", "auc"), "tempos": Provenance("rfm", "r2"),
                                "chords": Provenance("linear", "auc")}
    assert tempos.provenance == {"tempos": Provenance("rfm", "r2")}
    other_model = DirectionBank({}, ModelFingerprint("musicgen", 2, D), "rfm", "mean")
    with pytest.raises(BankMismatchError, match="2 layers"):
        notes.merge(other_model)


# --- arithmetic ---------------------------------------------------------------------------------------


def test_sum_difference_and_scaling():
    a, b = make_direction(1, "a"), make_direction(2, "b")
    s = a + b
    assert torch.allclose(s.vectors, a.vectors + b.vectors)
    assert torch.allclose(s.scores, (a.scores + b.scores) / 2)
    assert torch.allclose((a - b).vectors, a.vectors - b.vectors)
    assert torch.allclose((a * 2.5).vectors, 2.5 * a.vectors)
    assert torch.allclose((0.5 * a).vectors, a.vectors / 2)
    assert torch.equal((a * 3).scores, a.scores)
    assert torch.allclose((-a).vectors, -a.vectors)
    with pytest.raises(TypeError):
        a + 1.0
    with pytest.raises(ValueError, match="finite"):
        a * float("inf")


def test_orthogonalized_removes_the_component_along_b_per_layer():
    a, b = make_direction(1, "a"), make_direction(2, "b")
    o = a.orthogonalized(b)
    assert torch.allclose(o.cosine(b), torch.zeros(L), atol=1e-6)
    # What was removed lies along b at every layer.
    assert torch.allclose((a - o).cosine(b).abs(), torch.ones(L), atol=1e-5)
    zero_b = Direction(torch.zeros(L, D), torch.zeros(L), "zero")
    assert torch.equal(a.orthogonalized(zero_b).vectors, a.vectors)


def test_normalized_is_unit_and_keeps_zero_rows_zero():
    a = make_direction(1)
    vectors = a.vectors.clone()
    vectors[2] = 0
    n = Direction(vectors, a.scores, "a").normalized()
    assert torch.allclose(n.norms(), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(n.cosine(a)[[0, 1, 3]], torch.ones(3))


def test_cosine():
    a = make_direction(1)
    assert torch.allclose(a.cosine(a), torch.ones(L))
    assert torch.allclose(a.cosine(-a), -torch.ones(L))
    assert torch.allclose(a.cosine(a * 7), torch.ones(L))


def test_shape_mismatch_names_both_shapes():
    a, b = make_direction(1, "a"), make_direction(2, "b", shape=(L, 16))
    for op in (lambda: a + b, lambda: a - b, lambda: a.orthogonalized(b), lambda: a.cosine(b)):
        with pytest.raises(ValueError, match=r"'a' is \[4, 8\], direction 'b' is \[4, 16\]"):
            op()


def test_direction_validates_its_tensors():
    with pytest.raises(ValueError, match=r"scores must be a tensor \[4\]"):
        Direction(torch.randn(L, D), torch.rand(3), "x")
    with pytest.raises(ValueError, match="NaN or inf"):
        Direction(torch.full((L, D), float("nan")), torch.rand(L), "x")
    assert Direction(torch.randn(L, D, dtype=torch.float64), torch.rand(L), "x").vectors.dtype == torch.float32


# --- the file -----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    bank = make_bank(metadata={"dataset": "syntheory", "iters": 15}, score_name="auc")
    bank = bank.merge(make_bank("chords", ("major", "minor"), seed=1, metadata={"dataset": "syntheory", "iters": 15}))
    path = tmp_path / "sub" / "bank.safetensors"
    bank.save(path)
    loaded = DirectionBank.load(path)
    assert loaded.keys() == bank.keys()
    for key in bank.keys():
        assert torch.equal(loaded[key].vectors, bank[key].vectors)
        assert torch.equal(loaded[key].scores, bank[key].scores)
    assert loaded.fingerprint == FP
    assert (loaded.method, loaded.pooling, loaded.score_name, loaded.injection_point) == ("rfm", "mean", "auc", "residual")
    assert loaded.metadata == {"dataset": "syntheory", "iters": 15}
    assert loaded.concepts == {"notes": ["C", "D", "E"], "chords": ["major", "minor"]}
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write cleaned up


def test_file_layout_is_the_documented_one(tmp_path):
    path = tmp_path / "bank.safetensors"
    make_bank(classes=("C",)).save(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["notes:C/directions", "notes:C/scores"]
        header = json.loads(f.metadata()["musicrfm"])
    assert header["format"] == "musicrfm.direction-bank" and header["version"] == 1
    assert header["fingerprint"] == {"architecture": "musicgen", "num_layers": L, "hidden_size": D}
    assert header["concepts"] == {"notes": ["C"]}


def test_save_revalidates_a_mutated_bank(tmp_path):
    bank = make_bank()
    bank.directions["notes:F"] = make_direction(5)  # not unit
    with pytest.raises(BankFormatError, match="'notes:F' is not unit norm"):
        bank.save(tmp_path / "bank.safetensors")
    assert not (tmp_path / "bank.safetensors").exists()


def test_missing_file(tmp_path):
    with pytest.raises(BankNotFoundError, match="does not exist") as info:
        DirectionBank.load(tmp_path / "nope.safetensors")
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_files_name_the_path(tmp_path, damage):
    path = tmp_path / "bank.safetensors"
    make_bank().save(path)
    data = path.read_bytes()
    garbage = {"random": torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
               .numpy().tobytes(), "truncated": data[: len(data) - 40], "empty": b""}[damage]
    path.write_bytes(garbage)
    with pytest.raises(BankFormatError, match="not a readable safetensors file") as info:
        DirectionBank.load(path)
    assert str(path) in str(info.value)


def _write(path, tensors, header):
    meta = {} if header is None else {"musicrfm": header if isinstance(header, str) else json.dumps(header)}
    save_file(tensors, str(path), metadata=meta)


def _good_contents():
    bank = make_bank(classes=("C",))
    tensors = {"notes:C/directions": bank["notes:C"].vectors.clone(), "notes:C/scores": bank["notes:C"].scores.clone()}
    return tensors, bank.header()


@pytest.mark.parametrize("breakage,message", [
    ("no header", "not a musicrfm direction bank"),
    ("bad json", "not valid JSON"),
    ("format", "format is 'something-else'"),
    ("version", "version 2; this musicrfm reads version 1"),
    ("missing tensor", "'notes:C/scores' is missing"),
    ("extra tensor", "not listed in 'concepts': notes:D/directions"),
    ("wrong shape", r"'notes:C/directions' is float32 tensor \[4, 9\], expected float32 \[4, 8\]"),
    ("not unit", r"not unit norm at layer 2 \(norm 1.01\)"),
    ("nan", "NaN or inf"),
])
def test_load_validates_contents(tmp_path, breakage, message):
    tensors, header = _good_contents()
    if breakage == "no header":
        header = None
    elif breakage == "bad json":
        header = "{not json"
    elif breakage == "format":
        header["format"] = "something-else"
    elif breakage == "version":
        header["version"] = 2
    elif breakage == "missing tensor":
        del tensors["notes:C/scores"]
    elif breakage == "extra tensor":
        tensors["notes:D/directions"] = torch.zeros(L, D)
    elif breakage == "wrong shape":
        tensors["notes:C/directions"] = torch.randn(L, 9)
    elif breakage == "not unit":
        tensors["notes:C/directions"][2] *= 1.01
    elif breakage == "nan":
        tensors["notes:C/scores"][1] = float("nan")
    path = tmp_path / "bank.safetensors"
    _write(path, tensors, header)
    with pytest.raises(BankFormatError, match=message) as info:
        DirectionBank.load(path)
    assert str(path) in str(info.value)


# --- layer norms (what relative strength is a fraction of) ----------------------------------------------


def test_layer_norms_travel_in_the_file_and_merge_by_token_count(tmp_path):
    norms = LayerNorms((80.0, 100.0, 120.0, 140.0), (8.0, 9.0, 10.0, 11.0), 1000, "extraction: test")
    bank = make_bank(layer_norms=norms)
    bank.save(tmp_path / "a.safetensors")
    loaded = DirectionBank.load(tmp_path / "a.safetensors")
    assert loaded.layer_norms == norms
    assert make_bank().layer_norms is None  # a bank without them still saves and loads
    make_bank().save(tmp_path / "b.safetensors")
    assert DirectionBank.load(tmp_path / "b.safetensors").layer_norms is None
    # two banks of one model: the norms pooled, weighted by their token counts (mean and spread exactly)
    other = LayerNorms((100.0, 100.0, 100.0, 100.0), (0.0, 0.0, 0.0, 0.0), 3000, "other")
    merged = make_bank(layer_norms=norms).merge(make_bank("chords", ("major",), layer_norms=other)).layer_norms
    assert merged.tokens == 4000 and merged.mean == pytest.approx((95.0, 100.0, 105.0, 110.0))
    assert merged.std[0] == pytest.approx(((1000 * (64 + 6400) + 3000 * 10000) / 4000 - 95.0 ** 2) ** 0.5)
    assert make_bank(layer_norms=norms).merge(make_bank("chords", ("major",))).layer_norms == norms


@pytest.mark.parametrize("norms,message", [
    ({"mean": [1, 2, 3], "std": [0, 0, 0], "tokens": 5}, "layer_norms has 3 layers"),
    ({"mean": [1, 2, 3, 0], "std": [0, 0, 0, 0], "tokens": 5}, "means must be > 0"),
    ({"mean": [1, 2, 3, "x"], "std": [0, 0, 0, 0], "tokens": 5}, "must be a number"),
    ({"mean": [1, 2, 3, float("nan")], "std": [0, 0, 0, 0], "tokens": 5}, "must be finite"),
    ({"mean": [1, 2, 3, 4], "std": [0, 0, 0], "tokens": 5}, "one value per layer"),
    ({"mean": [1, 2, 3, 4], "std": [0, 0, 0, 0], "tokens": 0}, "tokens must be a whole number >= 1"),
    ({"mean": [1, 2, 3, 4], "std": [0, 0, 0, 0]}, "layer_norms lacks tokens"),
    ({"mean": [1, 2, 3, 4], "std": [0, 0, 0, 0], "tokens": 5, "extra": 1}, "unknown field 'extra'"),
    ("big", "layer_norms must be an object"),
])
def test_bad_layer_norms_in_a_file_name_the_problem(tmp_path, norms, message):
    path = tmp_path / "bank.safetensors"
    make_bank().save(path)
    with safe_open(str(path), framework="pt") as f:
        head, tensors = json.loads(f.metadata()["musicrfm"]), {k: f.get_tensor(k) for k in f.keys()}
    head["layer_norms"] = norms
    save_file(tensors, str(path), metadata={"musicrfm": json.dumps(head)})
    with pytest.raises(BankFormatError, match=message) as info:
        DirectionBank.load(path)
    assert str(path) in str(info.value)
