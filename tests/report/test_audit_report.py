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
    assert [p["name"] for p in data["passes"]] == ["StripAssertsPass", "DeadCodeEliminationPass"]
    assert (out / "flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "multiply-add = 1 FLOP" in md and "| layer |" in md
    back = rc.AuditReport.load(out / "report.json")
    assert back.to_dict() == data


def test_audit_of_unmodified_model(family_models):
    model = family_models("internvl")
    report = rc.audit(model, make_inputs("internvl", model))
    assert report.config is None and report.passes == []
    assert report.inputs["visual_tokens"] == 16
    assert report.flops_ratio == 1.0
