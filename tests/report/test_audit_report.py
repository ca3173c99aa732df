import json
import re

import pytest
import torch
from closed_forms import closed_form_per_layer
from tiny_families import IMAGE_TOKEN, VIDEO_TOKEN, make_inputs

import redlens_compile as rc
from redlens_compile.report.reading import fmt


def _settings(settings: dict) -> str:
    """A reduced layer's settings as the report writes them, built here from report.json's values
    (a window of None, taken off or never set, is not written)."""
    parts = [f"ffn_keep {settings['ffn_keep']:.3g}"] if settings["ffn_keep"] < 1.0 else []
    parts += [f"window {settings['window']}"] if settings["window"] is not None else []
    return ", ".join(parts)


def test_report_saves_json_markdown_png(tmp_path, identity_optimized):
    _, _, opt = identity_optimized("llava")
    out = opt.report.save(tmp_path / "out")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["flops.png", "flops.svg", "report.json", "report.md"]  # no temp files left behind
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == 2
    assert data["measurements"] == {}  # nothing measured by optimize itself
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
    # Each layer's "before" and "after" (what the audit says runs) is the unmodified layer: the closed form of
    # its FLOPs from the config, and the "before" of an optimization that reduces layers 0 and 2
    # (a separate capture and count), whose own "after" is below it exactly on those layers.
    cfg = model.config.text_config
    expected = closed_form_per_layer(cfg, torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])))
    reduced = rc.optimize(model, inputs, config=rc.RedLensConfig(layers=[0, 2])).report
    assert len(report.layers) == len(reduced.layers) == cfg.num_hidden_layers
    for audited, row in zip(report.layers, reduced.layers):
        for side in ("before", "after"):
            for kind in ("visual", "text"):
                for group in ("proj", "attn", "ffn"):
                    want = expected[kind][group]
                    assert abs(audited[side][group][kind] - want) <= 0.01 * want, (audited["layer"], side, kind, group)
        assert audited["before"] == row["before"] and audited["after"] == row["before"]
        reduced_total = sum(row["after"][g]["visual"] for g in row["after"])
        unmodified_total = sum(audited["after"][g]["visual"] for g in audited["after"])
        assert (reduced_total < unmodified_total) == (row["layer"] in (0, 2))
    assert reduced.flops_ratio < 1.0


def test_report_of_a_budget_shows_ranking_plan_and_settings(budget_saved):
    report, out, data, md = budget_saved  # the tiny LLaVA at flops_budget 0.6 (one optimize for the tests here)
    assert data["ranking"]["metric"] == "jsd" and len(data["ranking"]["scores"]) == 3
    assert data["plan"]["steps"] and data["chosen_layers"]
    for row in data["layers"]:
        assert (row["settings"] is not None) == row["reduced"] == (row["layer"] in data["chosen_layers"])
        if row["reduced"]:  # the plan's settings as they are (not rounded like FLOPs)
            assert row["settings"] == report.plan["settings"][str(row["layer"])]
            assert 0 < row["settings"]["ffn_keep"] <= 1
    assert [p["name"] for p in data["passes"]] == ["StripAssertsPass", "DynamicFFNPass", "HollowAttentionPass",
                                                   "CausalFastPathPass", "ThinLinearPass", "DeadCodeEliminationPass"]
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
    for name in ("report.json", "report.md", "flops.png", "flops.svg"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o666 & ~mask


# ---- the report a user reads: summary block, rounding, config diff, planner steps, figure ----------

MEASURED = dict(
    prefill_latency_s={"before": 0.0123456, "after": 0.00654321, "repeats": 5, "how": "median of 5 runs (test)"},
    logits={"last_position_max_abs_diff": 1.23456, "all_rows_max_abs_diff": 18.9123,
            "greedy_next_token_agreement": 1.0},
    generate={"max_new_tokens": 4, "tokens_equal": False, "tokens_matching": 3, "tokens_compared": 4,
              "before": "red </s>", "after": "blue </s>"},
    accuracy={"questions": 7, "before": {"colour": 1.0, "overall": 6 / 7}, "after": {"colour": 0.5, "overall": 5 / 7}},
)


def summary_block(markdown: str) -> list[str]:
    head, rest = markdown.split("## Summary\n\n", 1)
    assert head.startswith("# redlens-compile audit:") and "|" not in head  # the summary comes before every table
    block = rest.split("\n\n", 1)[0]
    return [line[2:] for line in block.splitlines()]


def line_starting(lines: list[str], prefix: str) -> str:
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


def three_digits(text: str) -> list[str]:
    """Every number in `text` with more than 3 significant digits (layer indices and counts aside)."""
    numbers = re.findall(r"\d+\.\d+(?:e[+-]\d+)?", text)
    return [n for n in numbers if len(n.split("e")[0].replace(".", "").lstrip("0")) > 3]


@pytest.fixture(scope="module")
def budget_saved(tmp_path_factory, family_models):
    model = family_models("llava")
    report = rc.optimize(model, make_inputs("llava", model), config=rc.RedLensConfig(flops_budget=0.6)).report
    report.add_measurements(**MEASURED)
    out = report.save(tmp_path_factory.mktemp("budget") / "report")
    return report, out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_the_summary_block_of_a_budget_run_gives_report_json_rounded(budget_saved):
    report, out, data, md = budget_saved
    lines = summary_block(md)
    t, m = data["totals"], data["measurements"]
    assert data["schema_version"] == 2
    assert line_starting(lines, "decoder prefill FLOPs:") == (
        f"decoder prefill FLOPs: {t['decoder_prefill_before']:.3g} -> {t['decoder_prefill_after']:.3g}, "
        f"ratio {t['decoder_prefill_ratio']:.3g} (flops_budget 0.6)")
    reduced = [row for row in data["layers"] if row["reduced"]]
    assert reduced
    assert line_starting(lines, "reduced:") == f"reduced: {len(reduced)} of 3 decoder layers: " + "; ".join(
        f"layer {row['layer']} {_settings(row['settings'])}"
        for row in reduced)
    assert line_starting(lines, "pruned:") == "pruned: nothing (no token pruning)"
    lat = m["prefill_latency_s"]
    assert lat["ratio"] == pytest.approx(0.00654321 / 0.0123456)  # the ratio is added by add_measurements
    assert line_starting(lines, "prefill latency:") == (
        f"prefill latency: {lat['before'] * 1e3:.3g} ms -> {lat['after'] * 1e3:.3g} ms, ratio {lat['ratio']:.3g} "
        "(median of 5 runs (test))") == "prefill latency: 12.3 ms -> 6.54 ms, ratio 0.53 (median of 5 runs (test))"
    logits = line_starting(lines, "logits at the last position")
    assert "max abs diff 1.23;" in logits and "100% of rows" in logits and "18.9" in logits
    assert m["logits"]["all_rows_max_abs_diff"] == 18.9123  # full precision, under its own name
    assert line_starting(lines, "greedy generate:") == \
        "greedy generate: 3 of 4 tokens the same (75%); 'blue </s>' against 'red </s>'"
    assert m["generate"]["token_agreement"] == 0.75
    assert line_starting(lines, "accuracy:") == "accuracy: 85.7% -> 71.4% on 7 held-out questions"
    assert "| colour | 100% | 50% |" in md and "| overall | 85.7% | 71.4% |" in md
    assert rc.AuditReport.load(out / "report.json").measurements == m  # measurements round trip


def test_settings_and_tables_are_rounded_to_three_digits(budget_saved):
    report, out, data, md = budget_saved
    assert three_digits(md.split("## Planner steps")[0]) == []  # every number above the steps
    for row in data["layers"]:
        if row["reduced"]:
            keep = row["settings"]["ffn_keep"]
            label = _settings(row['settings'])
            assert f"| {label} |" in md  # the layer table's settings column
    # the full-precision numbers stay in report.json
    assert data["totals"]["decoder_prefill_ratio"] == report.flops_ratio
    assert f"{report.flops_ratio:.3g}" in md and f"{report.flops_ratio:.4f}" not in md


def test_the_config_is_shown_as_its_changes_from_identity(budget_saved):
    _, _, data, md = budget_saved
    assert data["config"] == rc.RedLensConfig(flops_budget=0.6).to_dict()  # report.json: every field
    line = line_starting(md.splitlines(), "- config:")
    # prune is None: prune_keep, prune_layer, codebook, prune_seed are not shown though prune_keep 0.25 != 1.0
    assert line == ("- config: ffn_keep 0.5, flops_budget 0.6, hollow_window 64, layers auto, probe_tokens 0.1 "
                    "(the other fields as identity)")
    assert "fvcore on the eager decoder" in md
    cross = line_starting(md.splitlines(), "- cross-check")
    t = data["totals"]
    assert f"graph count {t['graph_total_before']:.3g}, fvcore on the eager decoder {t['eager_fvcore_decoder']:.3g}: " \
           "equal" in cross and "lm_head" in cross  # like for like: the whole decoder graph against the eager one


def test_the_planner_steps_are_grouped_per_layer(budget_saved):
    _, _, data, md = budget_saved
    plan = data["plan"]
    moves = plan["moves"]
    assert len(moves) == len(plan["steps"]) > 1
    section = md.split("## Planner steps", 1)[1].split("\n## ", 1)[0]
    assert f"({len(moves)} steps, per layer" in section.splitlines()[0]
    grouped = [line[2:] for line in section.splitlines() if line.startswith("- layer ")]
    touched = list(dict.fromkeys(m["layer"] for m in moves))
    assert [int(re.match(r"layer (\d+):", line).group(1)) for line in grouped] == touched  # one line a layer
    total = 0
    for layer, line in zip(touched, grouped):
        steps = int(re.search(r"via (\d+) steps?", line).group(1))
        assert steps == sum(1 for m in moves if m["layer"] == layer)
        total += steps
        settings = plan["settings"].get(str(layer))
        final = _settings(settings) if settings else "unreduced"
        assert line.startswith(f"layer {layer}: unreduced -> {final}, via {steps} step")
        last_ratio = [m["ratio"] for m in moves if m["layer"] == layer][-1]
        assert line.endswith(f"ratio after its last step {last_ratio:.3g}")
    assert total == len(moves)
    assert "{'ffn_keep'" not in section  # not the raw step strings


def test_the_figure_draws_totals_settings_and_measurements(budget_saved):
    import struct

    report, out, data, _ = budget_saved
    png = (out / "flops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1000 and height >= 500  # two panels at a readable size
    svg = (out / "flops.svg").read_text()
    assert "LlavaForConditionalGeneration (llava): decoder prefill FLOPs, before and after" in svg  # full title
    assert "flops_budget 0.6" in svg and f"after/before {report.flops_ratio:.3g}" in svg
    for row in data["layers"]:
        if row["reduced"]:
            assert all(part in svg for part in _settings(row["settings"]).split(", "))  # one line each
    assert "measured prefill latency: ratio 0.53" in svg and "12.3 ms" in svg and "6.54 ms" in svg
    assert "accuracy on 7 held-out questions" in svg and "85.7%" in svg


def test_a_pruned_report_shows_the_tokens_kept_and_only_the_config_that_acts(tmp_path):
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    image, qa = heldout_questions(1)[0]
    config = rc.RedLensConfig.preset("codebook-0.125")
    report = rc.optimize(model, encode_questions(processor, [image], [qa.question]), config=config).report
    report.add_measurements(prefill_latency_s={"before": 0.002, "after": 0.0011}, logits={
        "last_position_max_abs_diff": 0.5, "all_rows_max_abs_diff": None, "greedy_next_token_agreement": 1.0})
    out = report.save(tmp_path / "pruned")
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    lines = summary_block(md)
    p, t = data["pruning"], data["totals"]
    assert p["visual_before"] == [256] and p["visual_after"] == [32]
    assert line_starting(lines, "pruned:") == ("pruned: codebook before the first decoder layer: visual tokens per "
                                               f"sample 256 -> 32 (sequence {p['seq_len_before']} -> "
                                               f"{p['seq_len_after']})")
    assert line_starting(lines, "reduced:") == "reduced: no decoder layer"
    assert line_starting(lines, "decoder prefill FLOPs:").endswith(
        f"ratio {t['decoder_prefill_ratio']:.3g} (flops_budget 1)")
    assert line_starting(lines, "prefill latency:").startswith("prefill latency: 2 ms -> 1.1 ms, ratio 0.55")
    assert "every row" not in line_starting(lines, "logits at the last position")  # not defined when rows are dropped
    assert line_starting(lines, "accuracy:") == "accuracy: not measured"
    # the pruning knobs of codebook; nothing of the per-layer reductions (flops_budget 1: no layer reduced)
    assert line_starting(md.splitlines(), "- config:") == (
        f"- config: codebook {config.codebook}, layers auto, prune codebook, prune_keep 0.125 "
        "(the other fields as identity)")
    assert three_digits(md.split("## Passes")[0]) == []
    svg = (out / "flops.svg").read_text()
    assert "visual tokens kept per sample: 256 -&gt; 32" in svg and "token pruning: codebook" in svg


def test_numbers_for_reading():
    assert [fmt(v) for v in (0.11865234375, 0.066741943359375, 236528640, 1446.8, 999.95, 6.3, 12, 4096, None)] == \
        ["0.119", "0.0667", "2.37e+08", "1450", "1000", "6.3", "12", "4100", "n/a"]


def test_measurements_are_checked_and_a_schema_1_report_still_loads(identity_optimized):
    _, _, opt = identity_optimized("llava")
    report = rc.AuditReport.from_dict(opt.report.to_dict())
    with pytest.raises(rc.RedLensError, match="unknown group.*'latency'.*prefill_latency_s"):
        report.add_measurements(latency={"before": 1.0})
    with pytest.raises(rc.RedLensError, match="logits must be a dict"):
        report.add_measurements(logits=0.5)
    old = dict(report.to_dict(), schema_version=1)
    del old["measurements"]
    back = rc.AuditReport.from_dict(old)
    assert back.measurements == {} and "prefill latency: not measured" in back.to_markdown()
    with pytest.raises(rc.RedLensError, match="schema_version 3"):
        rc.AuditReport.from_dict(dict(old, schema_version=3))
