"""Config: defaults load, overrides apply, unknown keys and wrong types are errors that name the key."""

import pytest

from seqrank.training.config import ConfigError, load_config


def test_default_config_loads_and_override_applies(tmp_path):
    config = load_config(None, ["model.hidden_size=32", "optim.lr=0.01"])
    assert config.model.hidden_size == 32 and config.optim.lr == 0.01
    layered = tmp_path / "c.yaml"
    layered.write_text("model:\n  num_layers: 3\n")
    assert load_config(layered).model.num_layers == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.hiden_size=32", "model.hiden_size"),
        ("model.hidden_size=abc", "model.hidden_size"),
        ("optim.loss=hinge", "optim.loss"),
        ("model.dropout=1.5", "model.dropout"),
        ("nosection=1", "section.key=value"),
        ("model.num_heads=3", "num_heads"),
    ],
)
def test_bad_settings_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])
