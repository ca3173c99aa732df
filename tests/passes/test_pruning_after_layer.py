"""FastV and VTW: pruning after layer K, in the graph (two graphs and the stage between them).

FastV's selection is checked against eager attention maps of the original model; the logits
and generate against the original layers re-run from scratch on the kept rows."""

import copy

import pytest
import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs

NEW_TOKENS = 4
K = 0


def optimized(model, family, method, keep, layer=K):
    config = rc.RedLensConfig(prune=method, prune_keep=keep, prune_layer=layer, flops_budget=1.0)
    return rc.optimize(model, make_inputs(family, model), config=config)


def tail_reference(model, adapter, hidden, positions, start):
    """Layers start.. of the original model, the norm and the lm_head, on one sample's rows, no cache."""
    lm = adapter.language_model(model)
    n = hidden.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        rope = lm.rotary_emb(hidden, positions)
        text_positions = positions if positions.dim() == 2 else positions[0]
        for layer in list(lm.layers)[start:]:
            out = layer(hidden, attention_mask=mask, position_ids=text_positions, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        return adapter.lm_head(model)(lm.norm(hidden))


def kept_rows(prefill, decoder_inputs, b):
    rows = prefill.kept.index[b][prefill.kept.valid[b]]
    return rows[decoder_inputs.attention_mask[b, rows] == 1]


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_fastv_keeping_everything_is_exact_and_generates_like_the_original(family_models, family):
    model = family_models(family)
    opt = optimized(model, family, "fastv", 1.0)
    batch = make_inputs(family, model, batch=2, pad_left=(3,), seed=3)
    with torch.no_grad():
        assert (opt(**batch).logits - model(**batch).logits).abs().max() <= 1e-5
    # Decoding runs layer by layer (the project's own step): the same tokens as transformers' generate.
    ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    want = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, want)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_fastv_keeps_the_tokens_eager_attention_ranks_highest(family_models, family):
    model = family_models(family)
    layer, keep = 1, 0.25
    opt = optimized(model, family, "fastv", keep, layer=layer)
    batch = make_inputs(family, model, batch=2, pad_left=(2,), seed=9)
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, batch)
    with torch.no_grad():
        prefill = opt.run_decoder(decoder_inputs)
    # Independent reference: the original model with eager attention returns its attention maps.
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager(**batch, output_attentions=True).attentions[layer]  # [B, H, S, S]
    last_row = maps[:, :, -1, :].mean(dim=1)
    for b in range(2):
        visual = decoder_inputs.visual_mask[b].nonzero().flatten()
        count = round(visual.numel() * keep)
        order = torch.sort(last_row[b, visual], descending=True, stable=True).indices[:count]
        want = sorted(int(i) for i in visual[order])
        got = [int(i) for i in prefill.kept.index[b][prefill.kept.valid[b]] if decoder_inputs.visual_mask[b, i]]
        assert got == want


@pytest.mark.parametrize("method", ["fastv", "vtw"])
def test_prefill_and_generate_after_pruning_match_the_original_layers_rerun(family_models, method):
    family = "llava"
    model = family_models(family)
    opt = optimized(model, family, method, 0.125)
    batch = make_inputs(family, model, text_before=5, batch=2, pad_left=(3,), seed=11)
    gen_positions = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, dict(batch, position_ids=gen_positions))
    with torch.no_grad():
        prefill = opt.run_decoder(decoder_inputs)
        hidden_k = model(**batch, output_hidden_states=True).hidden_states[K + 1]  # output of layer K
    ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, -NEW_TOKENS:]
    expected_visual = 0 if method == "vtw" else round(64 * 0.125)
    for b in range(2):
        rows = kept_rows(prefill, decoder_inputs, b)
        assert int(decoder_inputs.visual_mask[b, rows].sum()) == expected_visual
        positions = decoder_inputs.position_ids[..., b:b + 1, rows]
        want = tail_reference(model, opt.adapter, hidden_k[b:b + 1, rows], positions, K + 1)[0]
        assert (prefill.logits[b, -rows.numel():] - want).abs().max() <= 1e-5
        # generate, from scratch each step: every row through layers 0..K (the original language
        # model's own forward), then the kept prompt rows and every new row through the layers after K.
        lm = opt.adapter.language_model(model)
        real = decoder_inputs.attention_mask[b].nonzero().flatten()
        embeds = decoder_inputs.inputs_embeds[b:b + 1, real]
        all_positions = decoder_inputs.position_ids[..., b:b + 1, real]
        take = torch.searchsorted(real, rows)  # the kept rows among the real ones
        tokens = []
        for _ in range(NEW_TOKENS):
            with torch.no_grad():
                hidden = lm(inputs_embeds=embeds, position_ids=all_positions, output_hidden_states=True).hidden_states[K + 1]
            logits = tail_reference(model, opt.adapter, hidden[:, take], all_positions[..., take], K + 1)
            tokens.append(int(logits[0, -1].argmax()))
            with torch.no_grad():
                embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
            all_positions = torch.cat([all_positions, all_positions[..., -1:] + 1], dim=-1)
            take = torch.cat([take, torch.tensor([embeds.shape[1] - 1])])
        assert ours[b].tolist() == tokens, (method, b)


def test_fastv_report_counts_the_shorter_tail_and_vtw_keeps_text_only(family_models):
    model = family_models("llava")
    fastv = optimized(model, "llava", "fastv", 8, layer=1)
    vtw = optimized(model, "llava", "vtw", 1.0, layer=1)
    for opt in (fastv, vtw):
        layers = {row["layer"]: row for row in opt.report.layers}
        total = lambda row, phase: sum(v for g in row[phase].values() for v in g.values())  # noqa: E731
        for i in (0, 1):  # layers up to K run on every row (K adds the last-query scores for fastv)
            assert total(layers[i], "after") >= total(layers[i], "before")
        assert total(layers[2], "after") < 0.5 * total(layers[2], "before")
    assert fastv.report.pruning["visual_after"] == [8] and vtw.report.pruning["visual_after"] == [0]
    assert fastv.report.pruning["where"] == "after decoder layer 1"
