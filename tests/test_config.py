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
                                             "codebook-0.125, .*, identity, random-0.125, .*, vtw-1, vtw-2"):
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
