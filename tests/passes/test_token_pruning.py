"""Token pruning before the first layer: the decoder runs on text + R visual rows, with the kept
rows' original positions; checked against the original decoder run sample by sample on the
pruned embeddings (the reference shares no code with the stage's gather, padding or cache)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_families import BOS, IMAGE_TOKEN, PAD, make_inputs

import redlens_compile as rc
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.capture.families import adapter_for
from redlens_compile.ops.token_pruning import select_rows

NEW_TOKENS = 4


def reference_rows(opt, decoder_inputs, b: int):
    """Sample b's real rows that the stage kept, as the original decoder sees them alone."""
    kept = opt.pruning(decoder_inputs).kept
    rows = kept.index[b][kept.valid[b]]
    rows = rows[decoder_inputs.attention_mask[b, rows] == 1]
    embeds = decoder_inputs.inputs_embeds[b, rows][None]
    positions = decoder_inputs.position_ids[..., b:b + 1, rows]
    return rows, embeds, positions


def original_logits(model, adapter, embeds, positions):
    with torch.no_grad():
        hidden = adapter.language_model(model)(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        return adapter.lm_head(model)(hidden)


def reference_generate(model, adapter, embeds, positions, steps: int) -> list[int]:
    """Greedy without a cache: the whole pruned sequence again for every new token."""
    tokens = []
    embed_tokens = model.get_input_embeddings()
    for _ in range(steps):
        token = int(original_logits(model, adapter, embeds, positions)[0, -1].argmax())
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed_tokens(torch.tensor([[token]]))], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    return tokens


def ragged_llava_inputs(model, generator_seed: int = 5) -> dict:
    """Row 0 holds one image, row 1 two: different visual counts in one batch (left-padded)."""
    g = torch.Generator().manual_seed(generator_seed)
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    words = lambda k: torch.randint(3, 90, (k,), generator=g)  # noqa: E731
    image = torch.full((n,), IMAGE_TOKEN)
    rows = [torch.cat([torch.tensor([BOS]), words(3), image, words(4)]),
            torch.cat([torch.tensor([BOS]), words(2), image, words(2), image, words(3)])]
    length = max(len(r) for r in rows)
    ids = torch.full((2, length), PAD)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, size, size, generator=g)}


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_keeping_every_visual_token_changes_nothing(family_models, family):
    model = family_models(family)
    example = make_inputs(family, model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune="random", prune_keep=1.0, flops_budget=1.0))
    batch = make_inputs(family, model, batch=2, pad_left=(2,), seed=3)
    with torch.no_grad():
        assert (opt(**batch).logits - model(**batch).logits).abs().max() <= 1e-5
    assert opt.report.flops_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_pruned_prefill_and_generate_match_the_original_decoder_on_the_kept_rows(family_models, family):
    model = family_models(family)
    example = make_inputs(family, model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune="random", prune_keep=0.125, flops_budget=1.0,
                                                                          prune_proportional=False))
    batch = make_inputs(family, model, text_before=5, batch=2, pad_left=(3,), seed=11)
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, batch)
    visual = int(decoder_inputs.visual_mask[0].sum())
    keep = round(visual * 0.125)
    with torch.no_grad():
        out = opt(**batch)
    pruned = opt.pruning(decoder_inputs)
    # The decoder ran on text + R rows per sample, and the cache holds exactly that.
    assert pruned.visual_after.tolist() == [keep, keep]
    text = (decoder_inputs.attention_mask.bool() & ~decoder_inputs.visual_mask).sum(dim=1)
    assert out.logits.shape[1] == int((text + keep).max())
    assert out.past_key_values.get_seq_length() == out.logits.shape[1]
    for b in range(2):
        rows, embeds, positions = reference_rows(opt, decoder_inputs, b)
        assert rows.numel() == int(text[b]) + keep
        assert torch.equal(torch.sort(rows).values, rows)  # order kept
        want = original_logits(model, opt.adapter, embeds, positions)[0]
        got = out.logits[b, -rows.numel():]
        assert (got - want).abs().max() <= 1e-5

    # generate: same prompt positions as transformers' generate makes them (M-RoPE, left padding).
    gen_positions = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
    gen_inputs = capture_decoder_inputs(model, opt.adapter, dict(batch, position_ids=gen_positions))
    ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, -NEW_TOKENS:]
    for b in range(2):
        _, embeds, positions = reference_rows(opt, gen_inputs, b)
        assert ours[b].tolist() == reference_generate(model, opt.adapter, embeds, positions, NEW_TOKENS)


def test_ragged_visual_counts_keep_a_fraction_of_each_sample(family_models):
    model = family_models("llava")
    opt = rc.optimize(model, make_inputs("llava", model),
                      config=rc.RedLensConfig(prune="random", prune_keep=0.25, flops_budget=1.0,
                                              prune_proportional=False))
    batch = ragged_llava_inputs(model)
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, batch)
    pruned = opt.pruning(decoder_inputs)
    assert pruned.visual_before.tolist() == [64, 128]
    assert pruned.visual_after.tolist() == [16, 32]
    with torch.no_grad():
        out = opt(**batch)
    for b in range(2):
        rows, embeds, positions = reference_rows(opt, decoder_inputs, b)
        want = original_logits(model, opt.adapter, embeds, positions)[0]
        assert (out.logits[b, -rows.numel():] - want).abs().max() <= 1e-5
    ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, -NEW_TOKENS:]
    for b in range(2):
        _, embeds, positions = reference_rows(opt, decoder_inputs, b)
        assert ours[b].tolist() == reference_generate(model, opt.adapter, embeds, positions, NEW_TOKENS)


def test_codebook_keeps_the_rows_least_similar_to_the_prototypes(family_models, tmp_path):
    model = family_models("llava")
    example = make_inputs("llava", model)
    decoder_inputs = capture_decoder_inputs(model, adapter_for(model), example)
    visual_rows = decoder_inputs.inputs_embeds[0][decoder_inputs.visual_mask[0]]
    prototypes = visual_rows[::9] + 0.01 * torch.randn(visual_rows[::9].shape, generator=torch.Generator().manual_seed(0))
    path = Codebook(prototypes, {"model_type": model.config.model_type}).save(tmp_path / "cb.safetensors")
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune="codebook", codebook=str(path), prune_keep=10,
                                                                flops_budget=1.0))
    kept = opt.pruning(decoder_inputs).kept
    kept_visual = [int(i) for i in kept.index[0] if decoder_inputs.visual_mask[0, i]]
    # Independent reference: cosine similarity of every visual row to every prototype.
    similarity = F.cosine_similarity(visual_rows[:, None, :], prototypes[None, :, :], dim=-1).amax(dim=1)
    positions = decoder_inputs.visual_mask[0].nonzero().flatten()
    want = sorted(int(positions[i]) for i in torch.argsort(similarity)[:10])
    assert kept_visual == want
    # cosine scores against the codebook, then each of the 54 dropped rows against the 10 kept ones
    assert opt.report.pruning["scoring_flops"] == 64 * prototypes.shape[0] * 64 + 54 * 10 * 64


def test_pruned_flops_match_the_closed_form_of_the_shorter_sequence(family_models):
    model = family_models("llava")
    example = make_inputs("llava", model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune="random", prune_keep=8, flops_budget=1.0))
    cfg = model.config.text_config
    d, f = cfg.hidden_size, cfg.intermediate_size
    d_kv = cfg.num_key_value_heads * d // cfg.num_attention_heads

    def layer(n: int) -> int:
        return n * d * (2 * d + 2 * d_kv) + 2 * d * n * (n + 1) // 2 + 3 * n * d * f

    seq = example["input_ids"].shape[1]
    assert opt.report.pruning["seq_len_after"] == seq - 64 + 8
    for row in opt.report.layers:
        before = sum(v for g in row["before"].values() for v in g.values())
        after = sum(v for g in row["after"].values() for v in g.values())
        assert before == pytest.approx(layer(seq), rel=1e-9)
        assert after == pytest.approx(layer(seq - 56), rel=1e-9)


def test_budget_planner_counts_the_pruned_sequence(family_models):
    model = family_models("llava")
    example = make_inputs("llava", model)
    pruned_only = rc.optimize(model, example, config=rc.RedLensConfig(prune="random", prune_keep=0.5,
                                                                        flops_budget=1.0))
    combined = rc.optimize(model, example, config=rc.RedLensConfig(prune="random", prune_keep=0.5, flops_budget=0.4))
    assert pruned_only.report.flops_ratio > 0.4  # pruning alone does not reach 0.4 ...
    assert combined.report.chosen_layers  # ... so the planner reduces layers of the pruned sequence
    assert 0.35 <= combined.report.flops_ratio <= 0.4


def test_select_rows_left_pads_the_shorter_sample():
    visual = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    score = torch.tensor([[0.0, 0.1, 0.9, 0.5, 0.0], [0.0, 0.3, 0.2, 0.0, 0.0]])
    kept = select_rows(visual, score, torch.tensor([1, 1]))
    assert kept.index.tolist() == [[0, 0, 2, 4], [0, 1, 3, 4]]
    assert kept.valid.tolist() == [[False, True, True, True], [True, True, True, True]]


def proportional_reference(model, adapter, decoder_inputs, kept_rows_b, b, steps):
    """The original language model on sample b's kept rows with an additive 4-D mask: causal, plus
    log(count) on each kept visual key for the dropped visual rows nearest to it (cosine). Greedy
    tokens recomputed from scratch each step; returns (prefill logits, tokens)."""
    embeds = decoder_inputs.inputs_embeds[b]
    visual = decoder_inputs.visual_mask[b]
    rows = kept_rows_b
    kept_visual = [int(r) for r in rows if visual[r]]
    dropped = [int(i) for i in visual.nonzero().flatten() if int(i) not in kept_visual]
    similarity = F.cosine_similarity(embeds[dropped][:, None], embeds[kept_visual][None], dim=-1)
    counts = torch.bincount(similarity.argmax(dim=1), minlength=len(kept_visual)).float() + 1
    bias = torch.zeros(rows.numel())
    for slot, row in enumerate(kept_visual):
        bias[(rows == row).nonzero()[0, 0]] = counts[slot].log()
    lm, head = adapter.language_model(model), adapter.lm_head(model)
    x = embeds[rows][None]
    positions = decoder_inputs.position_ids[..., b:b + 1, rows]
    first, tokens = None, []
    for _ in range(steps + 1):
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1) + torch.nn.functional.pad(bias, (0, n - bias.numel()))
        with torch.no_grad():
            logits = head(lm(inputs_embeds=x, attention_mask=mask[None, None], position_ids=positions).last_hidden_state)
        first = logits[0] if first is None else first
        tokens.append(int(logits[0, -1].argmax()))
        with torch.no_grad():
            x = torch.cat([x, model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    return first, tokens[:steps]


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_proportional_attention_gives_kept_rows_the_mass_of_the_dropped(family_models, family):
    model = family_models(family)
    opt = rc.optimize(model, make_inputs(family, model),
                      config=rc.RedLensConfig(prune="random", prune_keep=0.125, flops_budget=1.0))
    assert opt.pruning.key_bias and any(n.name == "key_bias" for n in opt.graph_module.graph.nodes)
    batch = make_inputs(family, model, text_before=5, batch=2, pad_left=(3,), seed=11)
    gen_positions = model._prepare_position_ids_for_generation(batch["input_ids"], dict(batch))
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, dict(batch, position_ids=gen_positions))
    with torch.no_grad():
        prefill = opt.run_decoder(decoder_inputs)
    ours = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])[:, -NEW_TOKENS:]
    for b in range(2):
        rows = prefill.kept.index[b][prefill.kept.valid[b]]
        rows = rows[decoder_inputs.attention_mask[b, rows] == 1]
        want, tokens = proportional_reference(model, opt.adapter, decoder_inputs, rows, b, NEW_TOKENS)
        assert (prefill.logits[b, -rows.numel():] - want).abs().max() <= 1e-5
        assert ours[b].tolist() == tokens
    # The bias is real: without it the prefill differs.
    plain = rc.optimize(model, make_inputs(family, model), config=rc.RedLensConfig(
        prune="random", prune_keep=0.125, flops_budget=1.0, prune_proportional=False))
    with torch.no_grad():
        assert (plain.run_decoder(decoder_inputs).logits - prefill.logits).abs().max() > 1e-3
