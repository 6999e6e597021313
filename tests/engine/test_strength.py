"""Strength units as a user meets them: `generate --steer` in relative units (the default) and `--units raw`,
the sidecar saying which and what each strength meant, and sidecars written before units existed."""

import json
import logging

import pytest
import torch

from musicrfm.engine.bank import DirectionBank, LayerNorms
from musicrfm.engine.generation import generate, generate_from_sidecar
from musicrfm.engine.model import load_model
from musicrfm.engine.steering import DirectionControl, LayerWeighting, SteeringSpec

from cli_runner import run_here

NORM = 40.0  # the bank's typical |h| at every layer: relative 0.5 is then exactly raw 20


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    """The same two directions with flat layer norms of NORM, and without any norms."""
    fp = load_model("tiny-random").fingerprint
    g = torch.Generator().manual_seed(0)
    vectors, scores = torch.randn(2, fp.num_layers, fp.hidden_size, generator=g), torch.rand(2, fp.num_layers, generator=g)
    folder = tmp_path_factory.mktemp("strength")
    norms = LayerNorms((NORM,) * fp.num_layers, (1.0,) * fp.num_layers, 100, "test: flat")
    for name, n in (("flat", norms), ("bare", None)):
        DirectionBank.from_arrays("notes", ["C", "G"], vectors, scores, fp, method="test", pooling="mean",
                                  layer_norms=n).save(folder / f"{name}.safetensors")
    return folder


def _generate(tmp_path, name, bank, *args):
    out = tmp_path / f"{name}.wav"
    r = run_here("generate", "--model", "tiny-random", "--prompt", "piano", "--seconds", "1", "--bank", bank, "--seed", "2",
            "--out", out, "--quiet", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(out.with_suffix(".json").read_text()), r


def _render(tiny, bank, coefficient, units, layers=LayerWeighting()):
    spec = SteeringSpec(controls=(DirectionControl("notes:C", coefficient),), layers=layers, units=units)
    return generate(tiny, "piano", 1.0, spec=spec, bank_paths=[bank], seed=2, progress=False).settings


def test_relative_strength_is_raw_strength_times_the_layer_norm(tmp_path, banks, tiny):
    bank = banks / "flat.safetensors"
    relative, _ = _generate(tmp_path, "relative", bank, "--steer", "notes:C=0.5")  # the command line's default
    raw, _ = _generate(tmp_path, "raw", bank, "--steer", f"notes:C={0.5 * NORM}", "--units", "raw")
    weaker = _render(tiny, bank, 0.5, "raw")
    assert relative["tokens_sha256"] == raw["tokens_sha256"] != weaker["tokens_sha256"]
    # the sidecar says which units, the norms, and what each strength was in hidden-state units
    assert relative["version"] == 2 and relative["steering"]["units"] == "relative"
    assert relative["layer_norms"]["mean"] == [NORM] * 4
    w = relative["vector_norms"]["notes:C"]  # exponential weighting: the best layer gets the full 0.5 x 40
    assert max(w) == pytest.approx(20.0, rel=1e-3) and len(w) == 4
    assert raw["vector_norms"] == relative["vector_norms"]


def test_with_the_norm_preserving_rule_a_relative_strength_is_its_alpha(banks, tiny):
    """(h + alpha |h| r) / (1 + alpha) is relative by construction: relative s is alpha, whatever the layer norms
    (the add rule's relative strength is scaled by them: the test above)."""
    from musicrfm.engine.steering import SteeringPlan

    bank = DirectionBank.load(banks / "flat.safetensors")
    plans = {units: SteeringPlan.compile(SteeringSpec(controls=(DirectionControl("notes:C", 0.5),), rule="norm",
                                                      units=units), bank, tiny.fingerprint)
             for units in ("relative", "raw")}
    torch.testing.assert_close(plans["relative"].weighted, plans["raw"].weighted, rtol=0, atol=0)
    add = SteeringPlan.compile(SteeringSpec(controls=(DirectionControl("notes:C", 0.5),)), bank, tiny.fingerprint)
    torch.testing.assert_close(add.weighted, NORM * plans["relative"].weighted)
    assert not add.directions_match(plans["relative"].spec)  # a rule change re-weights the directions


def test_a_bank_without_norms_is_measured_once_and_the_sidecar_replays_it(tiny, banks, caplog):
    with caplog.at_level(logging.WARNING, logger="musicrfm.norms"):
        side = _render(tiny, banks / "bare.safetensors", 0.5, "relative")
    assert "carries no layer norms" in caplog.text
    assert side["layer_norms"]["source"].startswith("measured: ")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicrfm.norms"):
        again = generate_from_sidecar(side, model=tiny, progress=False)
    assert "carries no layer norms" not in caplog.text  # the sidecar's norms are used, not measured again
    assert again.settings["tokens_sha256"] == side["tokens_sha256"]


def test_a_version_1_sidecar_replays_in_raw_units(tiny, banks):
    """Sidecars written before units existed were raw units and exact min-max weighting: read as such."""
    side = _render(tiny, banks / "flat.safetensors", 20.0, "raw", LayerWeighting("exponential", margin=0.0))
    old = dict(side, version=1)
    del old["layer_norms"], old["vector_norms"]
    old["steering"] = {k: v for k, v in side["steering"].items() if k != "units"}
    old["steering"]["layers"] = {k: v for k, v in side["steering"]["layers"].items() if k != "margin"}
    assert generate_from_sidecar(old, model=tiny, progress=False).settings["tokens_sha256"] == side["tokens_sha256"]
    with pytest.raises(ValueError, match="sidecar version 9 is not supported"):
        generate_from_sidecar(dict(side, version=9), model=tiny, progress=False)
