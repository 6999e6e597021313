"""The activations' typical size, measured at load for a bank that does not carry it (engine.norms)."""

import logging

import pytest
import torch

from musicrfm.engine.bank import DirectionBank, LayerNorms
from musicrfm.engine.norms import measure_layer_norms, read_activations, with_layer_norms
from musicrfm.engine.steering import DirectionControl, LayerWeighting, SteeringPlan, SteeringSpec


def _bank(model, norms=None) -> DirectionBank:
    fp = model.fingerprint
    g = torch.Generator().manual_seed(0)
    return DirectionBank.from_arrays("notes", ["C", "G"], torch.randn(2, fp.num_layers, fp.hidden_size, generator=g),
                                     torch.rand(2, fp.num_layers, generator=g), fp, method="test", pooling="mean",
                                     layer_norms=norms)


def test_measured_norms_are_the_generated_tokens_norms_and_deterministic(tiny):
    norms = measure_layer_norms(tiny, prompts=["piano"], seconds=0.5)
    assert norms.num_layers == tiny.num_layers and norms.tokens >= 20
    assert norms == measure_layer_norms(tiny, prompts=["piano"], seconds=0.5)  # replays get the same strength
    assert all(m > 0 for m in norms.mean) and all(s >= 0 for s in norms.std)
    assert norms.source.startswith("measured: ")
    attention = measure_layer_norms(tiny, "attention", prompts=["piano"], seconds=0.5)
    assert attention.mean != norms.mean  # another injection point, another size
    with pytest.raises(ValueError, match="site must be one of residual, attention"):
        measure_layer_norms(tiny, "mlp")


def test_read_activations_sees_the_attention_output_it_would_steer(tiny):
    codes = torch.randint(0, 64, (1, tiny.num_codebooks, 6), generator=torch.Generator().manual_seed(0))
    seen = {}
    read_activations(tiny, codes, "", lambda i, h: seen.setdefault(("attention", i), h.clone()), "attention")
    read_activations(tiny, codes, "", lambda i, h: seen.setdefault(("residual", i), h.clone()))
    for i in range(tiny.num_layers):
        assert seen[("attention", i)].shape == seen[("residual", i)].shape == (1, 7, tiny.hidden_size)
        assert not torch.equal(seen[("attention", i)], seen[("residual", i)])


def test_a_bank_without_norms_is_given_them_once_and_said(tiny, caplog):
    recorded = {"mean": [10.0] * tiny.num_layers, "std": [1.0] * tiny.num_layers, "tokens": 50, "source": "log"}
    given = with_layer_norms(_bank(tiny), tiny, recorded)
    assert given.layer_norms == LayerNorms.from_dict(recorded)  # a sidecar's / log's norms win: no measuring
    own = LayerNorms((3.0,) * tiny.num_layers, (0.0,) * tiny.num_layers, 9, "bank")
    assert with_layer_norms(_bank(tiny, own), tiny, recorded).layer_norms == own  # the bank's own come first
    with caplog.at_level(logging.WARNING, logger="musicrfm.norms"):
        measured = with_layer_norms(_bank(tiny), tiny)
    assert "carries no layer norms" in caplog.text
    assert measured.layer_norms.source.startswith("measured: ")
    spec = SteeringSpec(controls=(DirectionControl("notes:C", 0.5),), layers=LayerWeighting("all"))
    plan = SteeringPlan.compile(spec, measured, tiny.fingerprint)
    assert plan.vector_norms()["notes:C"] == pytest.approx([0.5 * m for m in measured.layer_norms.mean], rel=1e-4)
    assert with_layer_norms(None, tiny) is None


def test_the_bundled_model_brings_its_own_norms_for_a_bank_without_them(caplog):
    """musicgen-mini's recipe records its norms at both injection points (`musicrfm mini export` measures them):
    a bank of that model without its own takes them, with nothing measured."""
    from musicrfm.engine.model import bundled_layer_norms, load_model

    mini = load_model("musicgen-mini")
    for site in ("residual", "attention"):
        recorded = bundled_layer_norms("musicgen-mini", site)
        assert recorded is not None and len(recorded["mean"]) == mini.num_layers
    assert bundled_layer_norms("tiny-random", "residual") is None
    with caplog.at_level(logging.WARNING, logger="musicrfm.norms"):
        given = with_layer_norms(_bank(mini), mini)
    assert "carries no layer norms" not in caplog.text
    assert given.layer_norms == LayerNorms.from_dict(bundled_layer_norms("musicgen-mini", "residual"))
    # about the size the extraction measured for the bundled banks (generated tokens vs rendered clips: within 15 %)
    from musicrfm.engine.bank import DirectionBank as Bank
    from musicrfm.engine.model import bundled_banks

    extraction = Bank.load(bundled_banks("musicgen-mini")[0]).layer_norms
    assert extraction.source.startswith("extraction")
    assert given.layer_norms.mean == pytest.approx(extraction.mean, rel=0.15)
