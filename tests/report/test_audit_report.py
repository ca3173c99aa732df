import json

from tiny_families import make_inputs

import redlens_compile as rc


def test_report_saves_json_markdown_png(tmp_path, identity_optimized):
    _, _, opt = identity_optimized("llava")
    out = opt.report.save(tmp_path / "out")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["flops.png", "report.json", "report.md"]  # no temp files left behind
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == 1
    assert set(data["versions"]) >= {"torch", "transformers", "fvcore", "redlens_compile"}
    assert data["config"] == rc.RedLensConfig.identity().to_dict()
    assert len(data["layers"]) == 3
    assert data["totals"]["decoder_prefill_ratio"] == 1.0
    assert [p["name"] for p in data["passes"]] == ["StripAssertsPass", "CausalFastPathPass", "DeadCodeEliminationPass"]
    assert (out / "flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "multiply-add = 1 FLOP" in md and "| layer |" in md
    back = rc.AuditReport.load(out / "report.json")
    assert back.to_dict() == data


def test_audit_of_unmodified_model(family_models):
    model = family_models("internvl")
    inputs = make_inputs("internvl", model)
    report = rc.audit(model, inputs)
    assert report.config is None and report.passes == [] and report.chosen_layers == []
    assert report.inputs["visual_tokens"] == 64
    assert report.flops_ratio == 1.0
    # The same numbers as the "before" of an optimization that reduces layers 0 and 2 (a separate
    # capture and count), whose "after" differs exactly on those layers.
    reduced = rc.optimize(model, inputs, config=rc.RedLensConfig(layers=[0, 2])).report
    for audited, row in zip(report.layers, reduced.layers):
        assert audited["before"] == audited["after"] == row["before"]
        assert (row["after"] != row["before"]) == (row["layer"] in (0, 2))
    assert reduced.flops_ratio < 1.0


def test_report_of_a_budget_shows_ranking_plan_and_settings(tmp_path, family_models):
    model = family_models("llava")
    report = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(flops_budget=0.6)).report
    out = report.save(tmp_path / "budget")
    data = json.loads((out / "report.json").read_text())
    assert data["ranking"]["metric"] == "jsd" and len(data["ranking"]["scores"]) == 3
    assert data["plan"]["steps"] and data["chosen_layers"]
    for row in data["layers"]:
        assert (row["settings"] is not None) == row["reduced"] == (row["layer"] in data["chosen_layers"])
        if row["reduced"]:  # the plan's settings as they are (not rounded like FLOPs)
            assert row["settings"] == report.plan["settings"][str(row["layer"])]
            assert 0 < row["settings"]["ffn_keep"] <= 1
    assert [p["name"] for p in data["passes"]] == ["StripAssertsPass", "DynamicFFNPass", "HollowAttentionPass",
                                                   "CausalFastPathPass", "ThinLinearPass", "DeadCodeEliminationPass"]
    md = (out / "report.md").read_text()
    assert "## Layer ranking (jsd" in md and "## Planner steps" in md and "ffn_keep" in md
    assert data["totals"]["decoder_prefill_ratio"] <= 0.6


def test_an_audit_shows_one_column_integer_flops_and_normal_file_modes(family_models, tmp_path):
    import json
    import os

    from tiny_families import make_inputs

    model = family_models("llava")
    report = rc.audit(model, make_inputs("llava", model))
    assert report.is_audit
    markdown = report.to_markdown()
    assert "FLOPs: before" not in markdown and "visual after" not in markdown and "Per group, after" not in markdown
    assert "| layer | visual | text | proj | attn core | ffn |" in markdown
    assert "->" not in report.summary()
    report.save(tmp_path / "r")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert all(isinstance(v, int) for g in data["layers"][0]["before"].values() for v in g.values())
    assert isinstance(data["totals"]["decoder_prefill_before"], int)
    assert isinstance(data["totals"]["decoder_prefill_ratio"], float)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("report.json", "report.md", "flops.png"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o666 & ~mask
