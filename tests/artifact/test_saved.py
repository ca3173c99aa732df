"""save_pretrained / from_pretrained: optimize once, load in another process without ranking or planning.

The saved objects' logits and generated tokens are recorded here; one fresh interpreter loads
every folder (with the ranking and the planner replaced by functions that raise) and compares.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_families import build_and_reload, make_inputs

import redlens_compile as rc
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.models import PROOF_CODEBOOK

NEW_TOKENS = 4
# Budget plans like any other, made cheaply (optimize dominates this file's time): activation ranking
# (no sensitivity trials) and settings at the floors, so the planner's ladder has 4 rungs, not 12; the
# planner still mixes them (floors on some layers, looser rungs on others).
BUDGET = dict(flops_budget=0.6, ranking="activation", ffn_keep=0.0625, hollow_window=8)
# Proportional attention off where the planner ranks: the activation metric runs the eager decoder, which
# takes no key bias; the codebook-only cases keep it on, so the loaded graph's key-bias input is covered.
COMBINED = dict(BUDGET, flops_budget=0.35, prune="codebook", prune_keep=0.5, prune_proportional=False)
CODEBOOK = dict(flops_budget=1.0, prune="codebook", prune_keep=0.25)
# Every kind of plan on LLaVA; the combined plan (codebook pruning + a budget plan on the pruned
# sequence) on Qwen2-VL (M-RoPE) and the bundled model with its shipped codebook, which also
# prunes alone: 6 optimize + 6 loads keep the file near 40 s on 2 cores.
CASES = [("llava", "budget"), ("llava", "codebook"), ("llava", "combined"), ("qwen2-vl", "combined"),
         ("proof", "codebook"), ("proof", "combined")]

LOAD_SNIPPET = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
import redlens_compile as rc
import redlens_compile.api as api

def refuse(*args, **kwargs):
    raise AssertionError("the ranking or the planner ran while loading a saved plan")

api._rank = api.plan_to_budget = api.sensitivity_scores = api.activation_scores = refuse
results = {}
for case in json.loads(sys.argv[1]):
    model = AutoModelForImageTextToText.from_pretrained(case["model_dir"], attn_implementation="sdpa").eval()
    opt = rc.load(case["folder"], model)
    want = load_file(case["expected"])
    inputs = {k.removeprefix("input."): v for k, v in want.items() if k.startswith("input.")}
    with torch.no_grad():
        logits = opt(**inputs).logits
    ids = opt.generate(**inputs, max_new_tokens=%d, do_sample=False)
    results[case["name"]] = {"max_abs_logit_diff": float((logits - want["logits"]).abs().max()),
                             "logits_shape_equal": logits.shape == want["logits"].shape,
                             "tokens_equal": torch.equal(ids, want["tokens"]),
                             "settings": opt.report.plan["settings"]}
print("RESULTS " + json.dumps(results))
""" % NEW_TOKENS


def _proof_model():
    from redlens_compile.loading import load_model_dir
    from redlens_compile.models.demo import SHIPPED_MODEL_DIR
    from redlens_compile.models.evaluate import encode_questions
    from redlens_compile.models.shapes_task import heldout_questions

    model, processor = load_model_dir(SHIPPED_MODEL_DIR)
    image, qa = heldout_questions(1)[0]
    return model, encode_questions(processor, [image], [qa.question]), PROOF_CODEBOOK


def _family_model(family, family_models, tmp_path):
    model = family_models(family)
    hidden = model.config.text_config.hidden_size
    prototypes = torch.randn(8, hidden, generator=torch.Generator().manual_seed(0))
    codebook = Codebook(prototypes, {"model_type": model.config.model_type}).save(tmp_path / f"{family}.safetensors")
    return model, make_inputs(family, model), codebook


@pytest.fixture(scope="module")
def saved(family_models, tmp_path_factory):
    """(family, plan) -> (model, example, OptimizedModel, saved folder, expected-outputs file)."""
    tmp = tmp_path_factory.mktemp("saved")
    built, cache = {}, {}
    for family, plan in CASES:
        if family not in built:
            built[family] = _proof_model() if family == "proof" else _family_model(family, family_models, tmp)
        model, example, codebook = built[family]
        fields = {"budget": BUDGET, "codebook": CODEBOOK, "combined": COMBINED}[plan]
        if "prune" in fields:
            fields = dict(fields, codebook=str(codebook))
        opt = rc.optimize(model, example, config=rc.RedLensConfig(**fields))
        name = f"{family}-{plan}"
        folder = opt.save_pretrained(tmp / name)
        with torch.no_grad():
            logits = opt(**example).logits
        tokens = opt.generate(**example, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = tmp / f"{name}.expected.safetensors"
        save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous(),
                   **{f"input.{k}": v.contiguous() for k, v in example.items()}}, str(expected))
        cache[(family, plan)] = (model, example, opt, folder, expected)
    return cache


def test_saved_plans_load_in_a_fresh_process_with_equal_outputs(saved):
    cases = [{"name": f"{f}-{p}", "model_dir": str(saved[f, p][0].name_or_path), "folder": str(saved[f, p][3]),
              "expected": str(saved[f, p][4])} for f, p in CASES]
    done = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, json.dumps(cases)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS ", 1)[1])
    assert sorted(results) == sorted(c["name"] for c in cases)
    for (family, plan), (_, _, opt, _, _) in saved.items():
        got = results[f"{family}-{plan}"]
        assert got["logits_shape_equal"] and got["max_abs_logit_diff"] <= 1e-6, (family, plan, got)
        assert got["tokens_equal"], (family, plan)
        assert got["settings"] == opt.report.plan["settings"]  # the same per-layer settings, not re-planned
        # each kind of plan is what it says: reductions planned, tokens pruned, or both
        settings = opt.report.plan["settings"]
        assert bool(settings) == (plan != "codebook"), (family, plan)
        if plan == "budget":  # the planner's per-layer choices differ: what layers="all" could not state
            assert len({(s["ffn_keep"], s["window"]) for s in settings.values()}) > 1, settings
        assert (opt.report.pruning is not None) == (plan != "budget"), (family, plan)


def test_the_folder_holds_the_explicit_plan_as_json_and_safetensors(saved):
    _, _, opt, folder, _ = saved["llava", "combined"]
    assert {p.name for p in folder.iterdir()} == {"manifest.json", "plan.json", "redlens_config.json", "report.json",
                                                  "example.safetensors", "codebook.safetensors"}
    plan = rc.RedLensConfig.from_json((folder / "plan.json").read_text())
    assert plan.layers == {int(i): {"ffn_keep": s["ffn_keep"], "hollow_window": s["window"]}
                           for i, s in opt.report.plan["settings"].items()}
    assert (plan.prune, plan.prune_keep, plan.codebook) == ("codebook", 0.5, "codebook.safetensors")
    assert rc.RedLensConfig.from_json((folder / "redlens_config.json").read_text()) == opt.config
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["versions"]) >= {"redlens_compile", "torch", "transformers"}
    params = dict(opt.model.named_parameters())
    assert {n: p["shape"] for n, p in manifest["fingerprint"]["parameters"].items()} == \
        {n: list(p.shape) for n, p in params.items()}
    assert (folder / "codebook.safetensors").read_bytes() == Path(opt.config.codebook).read_bytes()


@pytest.fixture
def no_capture(monkeypatch):
    """Loading must fail before any capture: capturing raises here."""
    import redlens_compile.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("the decoder was captured before the folder and the model were checked")

    monkeypatch.setattr(api, "capture", refuse)


def test_another_model_fails_before_capture_naming_what_differs(saved, tmp_path, no_capture):
    model, _, _, folder, _ = saved["llava", "budget"]
    other = build_and_reload("llava", tmp_path / "other", seed=1)  # same class and config, other weights
    with pytest.raises(rc.SavedModelError, match=r"saved for another model: weights: \d+ of \d+ parameters hold "
                                                 r"other values \(sampled content hash\), e\.g\. "):
        rc.OptimizedModel.from_pretrained(folder, other)
    other.config.text_config.rms_norm_eps = 1e-3
    with pytest.raises(rc.SavedModelError, match=r"config: text_config\.rms_norm_eps saved 1e-06, this model 0\.001"):
        rc.load(folder, other)
    qwen = saved["qwen2-vl", "combined"][0]
    with pytest.raises(rc.SavedModelError, match="model class: saved LlavaForConditionalGeneration, this model "
                                                 "Qwen2VLForConditionalGeneration"):
        rc.load(folder, qwen)


@pytest.mark.parametrize("edit, message", [
    (lambda plan: plan["layers"]["0"].update(ffn_keep=1.5), r"plan\.json: layers\[0\]\.ffn_keep=1\.5: must be a fraction"),
    (lambda plan: plan["layers"]["0"].update(hollow_window=0), r"plan\.json: layers\[0\]\.hollow_window=0"),
    (lambda plan: plan.update(layers={"7": {"ffn_keep": 0.5}}), r"indices \[7\] are out of range; the decoder has 3"),
    (lambda plan: plan.update(layers="auto"), r"plan\.json: layers='auto'; a saved plan gives per-layer settings"),
    (lambda plan: plan.update(prune_keep=-2), r"plan\.json: prune_keep=-2: a count must be >= 1"),
])
def test_a_hand_edited_folder_fails_before_capture_naming_the_field(saved, tmp_path, no_capture, edit, message):
    model, _, _, folder, _ = saved["llava", "budget"]
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    plan = json.loads((edited / "plan.json").read_text())
    edit(plan)
    (edited / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(rc.ConfigError, match=message):
        rc.load(edited, model)


def test_another_transformers_release_is_named_and_a_foreign_folder_is_not_overwritten(saved, tmp_path, no_capture):
    model, _, opt, folder, _ = saved["llava", "budget"]
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["versions"]["transformers"] = "4.1.0"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(rc.SavedModelError, match=r"transformers version: saved with 4\.1\.0, this process has "):
        rc.load(edited, model)
    with pytest.raises(AssertionError, match="captured before"):  # check_versions=False: on to the capture
        rc.load(edited, model, check_versions=False)
    (edited / "manifest.json").unlink()
    with pytest.raises(rc.SavedModelError, match="manifest.json: missing"):
        rc.load(edited, model)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(rc.SavedModelError, match="exists and is not a saved optimized model"):
        opt.save_pretrained(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    first = shutil.copytree(folder, tmp_path / "first")
    (folder / "stale.txt").write_text("from an earlier save")
    opt.save_pretrained(folder)  # an earlier save is replaced whole, through a scratch folder
    assert {p.name for p in folder.iterdir()} == {p.name for p in first.iterdir()}
    assert (folder / "plan.json").read_text() == (first / "plan.json").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
