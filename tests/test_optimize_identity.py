"""Must show 1: identity optimization is exact for every family, forward and generate."""

import pytest
import torch
from conftest import ALL_FAMILIES
from tiny_families import make_inputs

from redlens_compile.ops.causal_attention import is_causal_mask, sdpa_causal_fast_path

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_logits_equal_on_example(identity_optimized, family):
    model, example, opt = identity_optimized(family)
    with torch.no_grad():
        ref = model(**example)
    out = opt(**example)
    assert type(out) is type(ref)
    assert max_diff(out.logits, ref.logits) <= TOL


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_logits_equal_on_other_prompt_length(identity_optimized, family):
    model, example, opt = identity_optimized(family)
    other = make_inputs(family, model, text_before=9, text_after=6, seed=3)
    assert other["input_ids"].shape[1] != example["input_ids"].shape[1]
    with torch.no_grad():
        ref = model(**other).logits
    assert max_diff(opt(**other).logits, ref) <= TOL


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_logits_equal_on_padded_batch_of_two(identity_optimized, family):
    model, _, opt = identity_optimized(family)
    batch = make_inputs(family, model, text_before=5, text_after=3, batch=2, pad_left=(4,), seed=5)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    with torch.no_grad():
        ref = model(**batch).logits
    assert max_diff(opt(**batch).logits, ref) <= TOL


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_identity_generate_matches_transformers_greedy(identity_optimized, family):
    model, example, opt = identity_optimized(family)
    for inputs in (example, make_inputs(family, model, text_before=6, text_after=2, batch=2, pad_left=(2,), seed=7)):
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        ours = opt.generate(**inputs, max_new_tokens=8)
        assert ours.shape == ref.shape
        assert torch.equal(ours, ref), (ours[:, -8:], ref[:, -8:])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_generate_reuses_kv_cache(identity_optimized, family, monkeypatch):
    """Decode steps feed one token each to the original model: the prefix is never recomputed."""
    model, example, opt = identity_optimized(family)
    seen_lengths = []
    handle = opt.adapter.language_model(model).register_forward_pre_hook(
        lambda m, a, k: seen_lengths.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        opt.generate(**example, max_new_tokens=5)
    finally:
        handle.remove()
    # one prefill capture (stopped at the decoder, full prompt), then 4 single-token decode steps
    assert seen_lengths == [example["input_ids"].shape[1], 1, 1, 1, 1]


def test_graph_module_is_the_rewritten_decoder(identity_optimized):
    _, _, opt = identity_optimized("llava")
    gm = opt.graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    # identity reduces nothing; every SDPA call takes the causal fast path when its mask allows it
    assert targets.count(sdpa_causal_fast_path) == 3
    assert targets.count(is_causal_mask) == 1  # one check per forward, shared by the layers
    assert targets.count(torch.ops.aten.linear.default) == 3 * 7 + 1  # 7 per layer + lm_head
    assert not any("assert" in str(t) for t in targets)
