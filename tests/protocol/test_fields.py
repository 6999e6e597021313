"""protocol/fields.py: the one field-check kit of the protocol, the engine's specs and score files."""

import pytest

from musicrfm.protocol import fields
from musicrfm.protocol.score import ScoreError
from musicrfm.protocol.wire import ProtocolError


@pytest.mark.parametrize("value, message", [
    ("0.3", "x must be a number, got '0.3'"),
    (True, "x must be a number, got True"),
    (float("nan"), "x must be finite, got nan"),
    (-float("inf"), "x must be finite, got -inf"),
    (10**400, "x must be finite, got an integer of 401 digits"),
    (1.5, r"x must be in \[0.0, 1.0\], got 1.5"),
])
def test_number_names_the_field_and_the_value(value, message):
    with pytest.raises(ValueError, match=message):
        fields.number("x", value, 0.0, 1.0)


def test_number_returns_a_float_and_each_reader_raises_its_own_error():
    assert fields.number("x", 2) == 2.0 and isinstance(fields.number("x", 2), float)
    with pytest.raises(ProtocolError):
        fields.number("x", None, error=ProtocolError)
    with pytest.raises(ScoreError):
        fields.number("x", None, error=ScoreError)


def test_whole_takes_integral_floats_only_when_asked():
    assert fields.whole("n", 7) == 7
    assert fields.whole("n", 1500.0, integral_floats=True) == 1500
    for bad in (1500.0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="n must be a whole number, got"):
            fields.whole("n", bad)
    with pytest.raises(ValueError, match=r"n must be a whole number in \[0, 9\], got 10"):
        fields.whole("n", 10, 0, 9)
    with pytest.raises(ValueError, match="n must be a whole number >= 0, got -1"):
        fields.whole("n", -1, 0)


def test_choice_and_fields():
    assert fields.choice("rule", "add", ("add", "norm")) == "add"
    with pytest.raises(ValueError, match="rule must be one of add, norm, got 'mul'"):
        fields.choice("rule", "mul", ("add", "norm"))
    assert fields.fields("gate", {"p": 1}, ("p", "seed")) == {"p": 1}
    with pytest.raises(ValueError, match="gate must be an object, got 0.3"):
        fields.fields("gate", 0.3, ("p", "seed"))
    with pytest.raises(ValueError, match="gate: unknown field 'q'; allowed: p, seed"):
        fields.fields("gate", {"q": 1}, ("p", "seed"))
    with pytest.raises(ScoreError, match="cue 1: unknown key 'q'; allowed: at"):
        fields.fields("cue 1", {"q": 1}, ("at",), kind="a table", key="key", error=ScoreError)
