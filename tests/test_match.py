"""Module-name patterns."""

import pytest

from quantcore import compile_pattern


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("model.lm_head", "model.lm_head", True),
        ("lm_head", "model.lm_head", True),  # dotted suffix
        ("lm_head", "model.lm_head_2", False),
        ("lm_head", "model.my_lm_head", False),
        ("head", "model.lm_head", False),
        ("layers.1.mlp", "model.layers.1.mlp", True),
        ("layers.1.mlp", "model.layers.11.mlp", False),
        ("*.mlp.*", "model.layers.0.mlp.up_proj", True),
        ("*.mlp.*", "model.layers.0.mlp", False),
        ("model.layers.?.self_attn", "model.layers.3.self_attn", True),
        ("model.layers.?.self_attn", "model.layers.13.self_attn", False),
        ("re:.*\\.(q|k)_proj", "model.layers.0.self_attn.q_proj", True),
        ("re:.*\\.(q|k)_proj", "model.layers.0.self_attn.v_proj", False),
        ("re:q_proj", "model.layers.0.self_attn.q_proj", False),  # the regex matches the whole name
    ],
)
def test_pattern_kinds(pattern, name, expected):
    assert compile_pattern(pattern)(name) is expected


@pytest.mark.parametrize("bad", ["", "re:(unclosed", None, 3])
def test_bad_patterns_are_value_errors(bad):
    with pytest.raises(ValueError, match="pattern"):
        compile_pattern(bad)
