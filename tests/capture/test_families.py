"""The derived adapter (capture/families.py): families with no table entry are served from what the
model itself says, checked against each family's own forward and generate; what it cannot serve is
refused with a clear error."""

import inspect
from pathlib import Path

import pytest
import torch
from tiny_families import FIRST_FAMILIES, GENERIC_FAMILIES, IMAGE_TOKEN, build_and_reload, make_inputs

import redlens_compile as rc
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.capture.export import served_seq_range
from redlens_compile.capture.families import FAMILIES, adapter_for

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_and_reload(family, tmp_path_factory.mktemp(family.replace(".", "_")))
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(GENERIC_FAMILIES))
def test_identity_equals_the_family_on_other_lengths_batches_and_generate(models, family):
    model = models(family)
    example = make_inputs(family, model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig.identity())
    longer = make_inputs(family, model, text_before=9, text_after=6, seed=1)
    batch = make_inputs(family, model, text_before=6, batch=2, pad_left=(3,), seed=2)
    with torch.no_grad():
        for inputs in (example, longer, batch):
            assert (opt(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-5
        want = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = opt.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", list(FIRST_FAMILIES) + list(GENERIC_FAMILIES))
def test_a_budget_of_0_6_is_met_and_generates(models, family_models, family):
    model = family_models(family) if family in FIRST_FAMILIES else models(family)
    opt = rc.optimize(model, make_inputs(family, model), config=rc.RedLensConfig(flops_budget=0.6))
    assert opt.report.flops_ratio <= 0.6 + 1e-9
    batch = make_inputs(family, model, text_before=5, batch=2, pad_left=(2,), seed=4)
    with torch.no_grad():
        assert (opt(**batch).logits - model(**batch).logits).abs().max() > 1e-4  # the reduction is real
        ids = opt.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ids.shape == (2, batch["input_ids"].shape[1] + NEW_TOKENS)


def test_the_derived_adapter_serves_classes_the_code_never_names(models):
    source = " ".join(p.read_text() for p in Path(rc.__file__).parent.rglob("*.py"))
    for family in GENERIC_FAMILIES:
        name = type(models(family)).__name__
        assert name not in source, f"{name} is named in the package: the test would not prove the derivation"
        assert not any(name in f.model_classes for f in FAMILIES)
    adapter = adapter_for(models("aya-vision"))
    assert (adapter.language_model_path, adapter.vision_tower_path, adapter.projector_paths, adapter.position_rows) == \
        ("model.language_model", "model.vision_tower", ("model.multi_modal_projector",), 1)
    idefics = adapter_for(models("idefics3"))
    assert (idefics.language_model_path, idefics.vision_tower_path, idefics.projector_paths) == \
        ("model.text_model", "model.vision_model", ("model.connector",))
    qwen = adapter_for(models("qwen2.5-vl"))
    assert qwen.projector_paths == ("model.visual.merger",) and qwen.position_rows == 3


def test_image_blocks_that_attend_both_ways_are_kept(models):
    """Gemma 3 lets an image's tokens see each other both ways: a causal graph would differ."""
    model = models("gemma3")
    inputs = make_inputs("gemma3", model)
    opt = rc.optimize(model, inputs, config=rc.RedLensConfig.identity())
    with torch.no_grad():
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, token_type_ids=None).logits
        assert (causal - model(**inputs).logits).abs().max() > 1e-4  # the trap is real
        assert (opt(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-5
    # Without token_type_ids the family silently computes causal image attention: refused.
    with pytest.raises(rc.CaptureError, match="needs token_type_ids"):
        opt(**{k: v for k, v in inputs.items() if k != "token_type_ids"})


SLIDING_FAMILIES = ("gemma3", "aya-vision")


def family_logits(model, embeds, positions, visual, bias=None, skip=0, capture=None):
    """The family's own base model on one sample's rows (no padding, no cache): its own mask code
    (sliding windows, Gemma 3's image blocks from token_type_ids), with `bias` [1, n] added to the
    scores of every layer from `skip` on, layers before `skip` passed through (the rows are already
    their output), and the hidden state after layer `capture` returned beside the logits."""
    lm, seen, hooks = model.get_decoder(), {}, []

    def biased(layer, args, kwargs):
        mask, n = kwargs.get("attention_mask"), embeds.shape[1]
        if mask is None:  # the family's sdpa skip: plain causal
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        blocked = torch.tensor(float("-inf"))
        kwargs["attention_mask"] = torch.where(mask, bias[:, None, None, :], blocked)
        return args, kwargs

    for index, layer in enumerate(lm.layers):
        if index < skip:
            hooks.append(layer.register_forward_hook(lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"],
                                                     with_kwargs=True))
        elif bias is not None:
            hooks.append(layer.register_forward_pre_hook(biased, with_kwargs=True))
        if index == capture:
            hooks.append(layer.register_forward_hook(lambda m, args, out: seen.setdefault("hidden", out)))
    extra = {"token_type_ids": visual.long()} if "token_type_ids" in inspect.signature(type(model.model).forward).parameters else {}
    try:
        with torch.no_grad():
            hidden = model.model(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones_like(visual).long(),
                                 **extra).last_hidden_state
            return model.lm_head(hidden), seen.get("hidden")
    finally:
        for hook in hooks:
            hook.remove()


def sample_rows(decoder_inputs, kept, b):
    """Sample b's kept real rows (original positions, in order)."""
    rows = kept.index[b][kept.valid[b]]
    return rows[decoder_inputs.attention_mask[b, rows] == 1]


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_sliding_window_decoders_serve_prompts_longer_than_the_window(models, family):
    """The window is part of the graph's masks: an example and prompts 4x longer than the window
    give the family's own logits and tokens, batched and left-padded."""
    model = models(family)
    window = model.config.text_config.sliding_window
    example = make_inputs(family, model)
    assert example["input_ids"].shape[1] > window
    opt = rc.optimize(model, example, config=rc.RedLensConfig.identity())
    assert opt.compiled.seq_range[1] == model.config.text_config.max_position_embeddings
    long = make_inputs(family, model, text_before=4 * window, batch=2, pad_left=(window + 3,), seed=7)
    assert long["input_ids"].shape[1] >= 4 * window + 64
    with torch.no_grad():
        for inputs in (example, long):
            assert (opt(**inputs).logits - model(**inputs).logits).abs().max() <= 1e-5
        want = model.generate(**long, max_new_tokens=2 * NEW_TOKENS, do_sample=False)
        got = opt.generate(**long, max_new_tokens=2 * NEW_TOKENS, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family, prune, proportional", [(f, p, True) for f in SLIDING_FAMILIES
                                                         for p in ("random", "codebook")] + [("aya-vision", "random", False)])
def test_pruning_with_the_key_bias_on_sliding_window_decoders_is_the_family_on_the_kept_rows(models, family, prune,
                                                                                             proportional, tmp_path):
    """Pruning before layer 0 with proportional attention: logits and greedy tokens are the family's
    own base model run on each sample's kept rows alone, its own masks plus the key bias (without
    the bias, plain pruning decodes through the family's own forward)."""
    model = models(family)
    window = model.config.text_config.sliding_window
    example = make_inputs(family, model)
    extra = {}
    if prune == "codebook":
        embeds = capture_decoder_inputs(model, adapter_for(model), example)
        visual_rows = embeds.inputs_embeds[0][embeds.visual_mask[0]]
        path = Codebook(visual_rows[::7].clone(), {"model_type": model.config.model_type}).save(tmp_path / "cb.safetensors")
        extra = {"codebook": str(path)}
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune=prune, prune_keep=0.25, flops_budget=1.0,
                                                                prune_proportional=proportional, **extra))
    batch = make_inputs(family, model, text_before=4 * window, batch=2, pad_left=(5,), seed=9)
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, batch)
    pruned = opt.pruning(decoder_inputs)
    if proportional:
        assert float(pruned.inputs.key_bias.max()) > 1.0  # the bias is real
    else:
        assert pruned.inputs.key_bias is None
    with torch.no_grad():
        out = opt(**batch)
        ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[:, -NEW_TOKENS:]
    embed_tokens = model.get_input_embeddings()
    for b in range(2):
        rows = sample_rows(decoder_inputs, pruned.kept, b)
        n = rows.numel()
        assert n > 4 * window
        embeds, positions = decoder_inputs.inputs_embeds[b, rows][None], decoder_inputs.position_ids[b:b + 1, rows]
        visual = decoder_inputs.visual_mask[b:b + 1, rows]
        bias = pruned.inputs.key_bias[b:b + 1, -n:] if proportional else None
        want, _ = family_logits(model, embeds, positions, visual, bias)
        assert (out.logits[b, -n:] - want[0]).abs().max() <= 1e-5
        tokens = []
        for _ in range(NEW_TOKENS):  # greedy without a cache: the whole kept sequence again per token
            logits, _ = family_logits(model, embeds, positions, visual, bias)
            tokens.append(int(logits[0, -1].argmax()))
            with torch.no_grad():
                embeds = torch.cat([embeds, embed_tokens(torch.tensor([[tokens[-1]]]))], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            visual = torch.cat([visual, visual.new_zeros(1, 1)], dim=1)
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(1, 1)], dim=1)
        assert ours[b].tolist() == tokens


@pytest.mark.parametrize("family, method, keep", [(f, m, k) for f in SLIDING_FAMILIES
                                                  for m, k in [("fastv", 1.0), ("fastv", 0.25), ("vtw", 0.25)]
                                                  if (f, m, k) != ("aya-vision", "fastv", 0.25)])  # CI time
def test_fastv_and_vtw_on_sliding_window_decoders_are_the_family_on_the_kept_rows(models, family, method, keep):
    """Layers 0..K on every row, K+1.. on the kept rows: each sample against the family's own base
    model run on the whole prompt up to layer K and on the kept rows after it (no cache, its own
    masks, re-run for every new token); keeping everything is the family's own generate."""
    model, layer = models(family), 1
    window = model.config.text_config.sliding_window
    opt = rc.optimize(model, make_inputs(family, model),
                      config=rc.RedLensConfig(prune=method, prune_keep=keep, prune_layer=layer, flops_budget=1.0))
    batch = make_inputs(family, model, text_before=4 * window, batch=2, pad_left=(5,), seed=9)
    with torch.no_grad():
        ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        if keep == 1.0 and method == "fastv":
            assert (opt(**batch).logits - model(**batch).logits).abs().max() <= 1e-5
            assert torch.equal(ours, model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                    eos_token_id=None))
        decoder_inputs = capture_decoder_inputs(model, opt.adapter, batch)
        prefill = opt.run_decoder(decoder_inputs)
    embed_tokens = model.get_input_embeddings()
    for b in range(2):
        real = decoder_inputs.attention_mask[b] == 1
        embeds, positions = decoder_inputs.inputs_embeds[b, real][None], decoder_inputs.position_ids[b:b + 1, real]
        visual = decoder_inputs.visual_mask[b:b + 1, real]
        # kept rows as indices into the sample's real rows
        offset = int((~real).sum())
        rows = sample_rows(decoder_inputs, prefill.kept, b) - offset
        assert rows.numel() == int(real.sum()) - int(visual.sum()) + (0 if method == "vtw" else round(int(visual.sum()) * keep))
        tokens = []
        for step in range(NEW_TOKENS + 1):
            _, hidden = family_logits(model, embeds, positions, visual, capture=layer)
            keep_rows = torch.cat([rows, torch.arange(embeds.shape[1] - step, embeds.shape[1])])
            logits, _ = family_logits(model, hidden[:, keep_rows], positions[:, keep_rows], visual[:, keep_rows],
                                      skip=layer + 1)
            if step == 0:
                n = keep_rows.numel()
                assert (prefill.logits[b, -n:] - logits[0]).abs().max() <= 1e-5
            if step == NEW_TOKENS:
                break
            tokens.append(int(logits[0, -1].argmax()))
            with torch.no_grad():
                embeds = torch.cat([embeds, embed_tokens(torch.tensor([[tokens[-1]]]))], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            visual = torch.cat([visual, visual.new_zeros(1, 1)], dim=1)
        assert ours[b, -NEW_TOKENS:].tolist() == tokens


def test_prompts_beyond_the_positions_are_refused_in_words_that_fit(models):
    """A full-attention decoder's length error names its positions, never a window."""
    model = models("mistral3")
    opt = rc.optimize(model, make_inputs("mistral3", model), config=rc.RedLensConfig.identity())
    limit = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"serves at most {limit} \(the model's max_position_embeddings\)") as error:
        opt(**make_inputs("mistral3", model, text_before=limit))
    assert "window" not in str(error.value)


def test_the_unbounded_range_export_gives_is_read_as_the_model_limit():
    """torch.export's unbounded upper bound is int_oo (sympy says it is finite): served_seq_range
    reads it as the model's limit instead of failing on int(infinity)."""
    from torch.export import Dim

    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2

    program = torch.export.export(Twice(), (torch.ones(2, 5),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder")
    placeholder.name = "inputs_embeds"
    assert served_seq_range(program, 300) == (2, 300)


def test_encoder_decoder_models_are_refused():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32),
        text_config=dict(model_type="t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64),
        num_query_tokens=4, image_token_index=60)
    model = Blip2ForConditionalGeneration(config).eval()
    with pytest.raises(rc.UnsupportedModelError, match="encoder-decoder text model"):
        rc.optimize(model, {"input_ids": torch.tensor([[60, 1, 2]])}, config=rc.RedLensConfig.identity())


def test_the_readme_family_table_is_the_recorded_run_and_the_code_agrees_with_it(models, family_models):
    """The README's table is scripts/families_table.py's record (each "yes" there is a run that did
    what the column says, on the family's tiny model); the code still reads every family's
    structure as recorded, and what it would refuse matches the recorded runs' verdicts."""
    import json
    import sys

    from tiny_families import FAMILIES

    from redlens_compile.capture.families import support_row
    from redlens_compile.capture.layer_kinds import unserved_reason

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "scripts"))
    from families_table import RUN_COLUMNS, families_table

    recorded = json.loads((root / "benchmarks" / "results" / "families.json").read_text())["rows"]
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- families:start -->\n")[1].split("\n<!-- families:end -->")[0]
    assert block == families_table(recorded), "README out of date: run .venv/bin/python scripts/families_table.py"
    assert [row["tiny_family"] for row in recorded] == list(FAMILIES)
    for row in recorded:
        name = row["tiny_family"]
        model = family_models(name) if name in FIRST_FAMILIES else models(name)
        structure = support_row(model)
        assert {k: row["cells"][k] for k in structure} == structure, name
        assert list(row["cells"]) == [*structure, *RUN_COLUMNS]
        adapter = adapter_for(model)
        layered = unserved_reason(model, adapter) is None
        assert (row["cells"]["fastv / vtw"] == "yes") == layered, name
        assert (row["cells"]["pruning before layer 0"] == "yes") == layered, name
        assert (row["cells"]["ONNX"] == "prefill + decode step") == (not adapter.sliding_layer_types(model)), name
        assert row["cells"]["identity, reductions"] == "yes", name


def test_the_layered_decode_names_the_decoders_it_cannot_run():
    """Layer kinds other than full and sliding (chunked), and layers that take inputs the family's
    forward computes across layers (Gemma 4's per-layer inputs, shared KV), are refused by name."""
    from types import SimpleNamespace

    from redlens_compile.artifact.layered_decode import unserved_reason
    from redlens_compile.capture.families import FamilyAdapter

    class PlainLayer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            return hidden_states

    class PerLayerInputs(PlainLayer):
        def forward(self, hidden_states, per_layer_input=None, shared_kv_states=None, **kwargs):
            return hidden_states

    def decoder(layer, kinds):
        model = torch.nn.Module()
        model.lm = torch.nn.Module()
        model.lm.layers = torch.nn.ModuleList([layer])
        model.lm.config = SimpleNamespace(layer_types=kinds)
        return model

    adapter = FamilyAdapter("x", (), "vision", (), language_model_path="lm")
    assert unserved_reason(decoder(PlainLayer(), ["sliding_attention", "full_attention"]), adapter) is None
    assert "chunked_attention" in unserved_reason(decoder(PlainLayer(), ["chunked_attention"]), adapter)
    why = unserved_reason(decoder(PerLayerInputs(), ["full_attention"]), adapter)
    assert "per_layer_input" in why and "shared_kv_states" in why
