import json

import pytest

import redlens_compile as rc
from redlens_compile.config import UNBOUNDED_WINDOW


def test_json_round_trip_preserves_every_field():
    cfg = rc.RedLensConfig(flops_budget=0.4, ffn_keep=0.25, probe_tokens=16, hollow_window=32, layers=[3, 1],
                           ranking="kl", prune="fastv", prune_keep=0.3, prune_layer=1)
    back = rc.RedLensConfig.from_json(cfg.to_json())
    assert back == cfg
    assert json.loads(cfg.to_json())["layers"] == [3, 1]


def test_identity_settings_change_no_number():
    cfg = rc.RedLensConfig.identity()
    assert (cfg.ffn_keep, cfg.hollow_window, cfg.prune, cfg.layers, cfg.flops_budget) == (1.0, UNBOUNDED_WINDOW, None, "all", 1.0)
    assert cfg.is_identity
    assert rc.RedLensConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_field_and_bad_json_are_rejected():
    with pytest.raises(rc.ConfigError, match=r"unknown config field\(s\) \['budget'\]"):
        rc.RedLensConfig.from_dict({"budget": 0.5})
    with pytest.raises(rc.ConfigError, match="not valid JSON"):
        rc.RedLensConfig.from_json("{flops_budget: 0.5")


def test_bool_is_not_a_count():
    with pytest.raises(rc.ConfigError, match="hollow_window=True"):
        rc.RedLensConfig(hollow_window=True)


def test_parse_preset_json_text_and_file(tmp_path):
    assert rc.RedLensConfig.parse("identity") == rc.RedLensConfig.identity()
    assert rc.RedLensConfig.parse('{"flops_budget": 0.7}').flops_budget == 0.7
    path = tmp_path / "cfg.json"
    path.write_text('{"ffn_keep": 0.25}')
    assert rc.RedLensConfig.parse(str(path)).ffn_keep == 0.25
    with pytest.raises(rc.ConfigError, match="unknown config preset 'fast'; presets: budget-0.5, budget-0.75, "
                                             "codebook-0.09, codebook-0.125, .*, identity, random-0.125, .*, vtw-1, vtw-2"):
        rc.RedLensConfig.parse("fast")
    pruning = rc.RedLensConfig.parse("codebook-0.125")
    assert (pruning.prune, pruning.prune_keep, pruning.flops_budget) == ("codebook", 0.125, 1.0)
    assert pruning.codebook.endswith("proof_llava/codebook.safetensors")
    assert rc.RedLensConfig.parse("vtw-2").prune_layer == 2
    assert rc.RedLensConfig.parse("budget-0.5").flops_budget == 0.5
    hollow = rc.RedLensConfig.parse("hollow-only")
    assert hollow.ffn_keep == 1.0 and hollow.hollow_window == 64 and hollow.layers == "all"
    with pytest.raises(rc.ConfigError, match="no such file"):
        rc.RedLensConfig.parse(str(tmp_path / "missing.json"))


def test_per_layer_settings_round_trip_through_json_with_int_keys():
    cfg = rc.RedLensConfig(layers={3: {"ffn_keep": 0.0625, "hollow_window": 8}, 1: {"hollow_window": None},
                                   "0": {"ffn_keep": 1, "hollow_window": UNBOUNDED_WINDOW}})
    # int keys, sorted; a missing field takes the config's own; an unbounded window is "off" (None)
    assert cfg.layers == {0: {"ffn_keep": 1.0, "hollow_window": None}, 1: {"ffn_keep": 0.5, "hollow_window": None},
                          3: {"ffn_keep": 0.0625, "hollow_window": 8}}
    text = cfg.to_json()
    assert json.loads(text)["layers"]["3"] == {"ffn_keep": 0.0625, "hollow_window": 8}
    back = rc.RedLensConfig.from_json(text)
    assert back == cfg and list(back.layers) == [0, 1, 3]


@pytest.mark.parametrize("layers, message", [
    ({"x": {"ffn_keep": 0.5}}, r"layers: key 'x' is not a layer index"),
    ({-1: {"ffn_keep": 0.5}}, r"layers: key -1 is not a layer index"),
    ({2: {"ffn_keep": 1.5}}, r"layers\[2\]\.ffn_keep=1\.5: must be a fraction with 0 < ffn_keep <= 1"),
    ({2: {"ffn_keep": 0.0}}, r"layers\[2\]\.ffn_keep=0\.0"),
    ({2: {"hollow_window": 0}}, r"layers\[2\]\.hollow_window=0: must be an int >= 1, or null"),
    ({2: {"hollow_window": 8.5}}, r"layers\[2\]\.hollow_window=8\.5"),
    ({2: {"window": 8}}, r"layers\[2\]: unknown field\(s\) \['window'\]"),
    ({2: 0.5}, r"layers\[2\]=0\.5: must be an object"),
    ({2: {}, "2": {}}, r"layer 2 is given twice"),
])
def test_bad_per_layer_settings_name_the_field(layers, message):
    with pytest.raises(rc.ConfigError, match=message):
        rc.RedLensConfig(layers=layers)


def test_presets_live_beside_the_config_and_point_into_the_bundled_model():
    from redlens_compile import presets
    from redlens_compile.models import PROOF_CODEBOOK

    names = presets.preset_names()
    assert {"identity", "budget-0.5", "codebook-0.125", "fastv-0.25", "vtw-1", "codebook-0.25+budget-0.2"} <= set(names)
    for name in names:  # the classmethod delegates: the same config for every name
        assert rc.RedLensConfig.preset(name) == presets.preset(name)
    assert presets.parse(" fastv-0.25 ").prune_layer == presets.PRESET_PRUNE_LAYER == 1
    assert rc.RedLensConfig.preset("codebook-0.125").codebook == str(PROOF_CODEBOOK)
    assert PROOF_CODEBOOK.is_file()  # the shipped file the codebook presets name
