"""HollowAttentionPass and its blockwise op: exact at a window >= the visual span, equal to an
independently written masked reference at small windows, idempotent."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_FAMILIES
from tiny_families import make_inputs

from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.ops.hollow_attention import hollow_attention, hollow_plan
from redlens_compile.ops.rows import visual_layout
from redlens_compile.passes import DeadCodeEliminationPass, HollowAttentionPass, StripAssertsPass, run_passes
from redlens_compile.passes.selectors import clone_graph_module

TOL = 1e-5


def reference_mask(family_mask: torch.Tensor, visual: torch.Tensor, window: int) -> torch.Tensor:
    """The hollow pattern written out element by element (DESIGN.md), on top of the family's mask."""
    batch, seq = visual.shape
    mask = family_mask.clone()
    for b in range(batch):
        for i in range(seq):
            for j in range(seq):
                if visual[b, i] and visual[b, j] and abs(i - j) >= window:
                    mask[b, 0, i, j] = False
    return mask


def random_case(seed: int, bidirectional: bool):
    g = torch.Generator().manual_seed(seed)
    batch, heads, seq, dim = 2, 4, 30, 8
    visual = torch.zeros(batch, seq, dtype=torch.bool)
    visual[0, 3:13] = True  # two images in one row, text between them
    visual[0, 16:25] = True
    visual[1, 6:20] = True  # another count: ragged
    pad = torch.ones(batch, seq, dtype=torch.bool)
    pad[1, :2] = False  # left padding
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    family = causal[None, None] & pad[:, None, None, :]
    if bidirectional:  # a family whose image tokens see each other both ways
        same_image = visual[:, :, None] & visual[:, None, :]
        family = family | (same_image[:, None] & pad[:, None, None, :])
    q = torch.randn(batch, heads, seq, dim, generator=g)
    k = torch.randn(batch, heads, seq, dim, generator=g)
    v = torch.randn(batch, heads, seq, dim, generator=g)
    return q, k, v, family, visual


@pytest.mark.parametrize("window", [1, 3, 5, 64])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_blockwise_op_equals_masked_reference(window, bidirectional):
    q, k, v, family, visual = random_case(window, bidirectional)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(family, visual, window))
    layout = visual_layout(visual)
    got = hollow_attention(q, k, v, hollow_plan(family, visual, *layout[:2], *layout[3:5], window))
    rows = family[:, 0].any(-1)  # fully masked (padding) rows are undefined in both
    assert (got - want).abs()[rows[:, None, :, None].expand_as(got)].max().item() <= TOL


def _windows(captured, window):
    return {i: window for i in range(len(captured.decoder.language_model.layers))}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_window_as_long_as_the_visual_span_is_exact(captured_family, family):
    model, _, captured = captured_family(family)
    span = int(captured.example.visual_mask.sum(dim=1).max())
    gm = clone_graph_module(captured.graph_module)
    hollow = HollowAttentionPass(window=_windows(captured, span))
    gm, records = run_passes(gm, [StripAssertsPass(), hollow, DeadCodeEliminationPass()])
    assert records[1].modified and not records[1].findings["fallback"]
    assert sum(n.target is hollow_attention for n in gm.graph.nodes) == len(hollow.window)
    assert not any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    others = [make_inputs(family, model, text_before=9, text_after=6, seed=3),
              make_inputs(family, model, text_before=5, text_after=3, batch=2, pad_left=(4,), seed=5)]
    for inputs in [captured.example, *(capture_decoder_inputs(model, captured.adapter, x) for x in others)]:
        with torch.no_grad():
            want, got = captured.graph_module(*inputs.as_args()), gm(*inputs.as_args())
        for a, b in zip(got, want):
            assert (a - b).abs().max().item() <= TOL
    _, again = run_passes(gm, [HollowAttentionPass(window=_windows(captured, span))])
    assert not again[0].modified


def test_small_window_changes_only_what_it_should(captured_family):
    """Window 4 on llava: logits move; text rows before the image and the KV cache's text rows do not."""
    _, _, captured = captured_family("llava")
    gm, _ = run_passes(clone_graph_module(captured.graph_module),
                       [StripAssertsPass(), HollowAttentionPass(window=_windows(captured, 4))])
    args = captured.example.as_args()
    with torch.no_grad():
        want, got = captured.graph_module(*args), gm(*args)
    first_visual = int(captured.example.visual_mask[0].nonzero()[0])
    assert (got[0][:, :first_visual] - want[0][:, :first_visual]).abs().max().item() <= TOL
    assert (got[0] - want[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("window", [2, 7])
def test_causal_shortcut_equals_masked_reference(window):
    """mask_is_causal=True (the graph found the mask exactly causal): same numbers, no mask gathers."""
    q, k, v, _, visual = random_case(window, bidirectional=False)
    seq = visual.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(2, 1, seq, seq)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(causal.clone(), visual, window))
    layout = visual_layout(visual)
    got = hollow_attention(q, k, v, hollow_plan(causal, visual, *layout[:2], *layout[3:5], window, mask_is_causal=True))
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_additive_block_mask_gives_the_same_numbers(dtype, bidirectional):
    """score_dtype (the pass sets it): the SDPA blocks and the text queries read the plan's additive
    masks, made once, with the same result bit for bit as SDPA's own conversion of the bool mask (left
    padding included: its rows see no key); no additive block mask for the small-block path (it masks
    its own scores); queries of another dtype take the bool masks."""
    q, k, v, family, visual = random_case(11, bidirectional)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    layout = visual_layout(visual)
    window = 12  # blocks of 6 rows: the SDPA path
    plain = hollow_plan(family, visual, *layout[:2], *layout[3:5], window)
    scored = hollow_plan(family, visual, *layout[:2], *layout[3:5], window, score_dtype=dtype)
    assert plain.block_scores is None and not scored.small
    assert scored.block_scores.dtype == dtype
    assert torch.equal(scored.block_scores == 0, scored.allowed)
    assert torch.isneginf(scored.block_scores[~scored.allowed]).all()
    assert plain.text_scores is None and torch.equal(scored.text_scores == 0, scored.text_allowed)
    assert torch.equal(hollow_attention(q, k, v, scored), hollow_attention(q, k, v, plain))
    other = hollow_plan(family, visual, *layout[:2], *layout[3:5], window, score_dtype=torch.float16)
    assert torch.equal(hollow_attention(q, k, v, other), hollow_attention(q, k, v, plain))
    small = hollow_plan(family, visual, *layout[:2], *layout[3:5], 3, score_dtype=dtype)
    assert small.small and small.block_scores is None and small.text_scores is not None
    assert torch.equal(hollow_attention(q, k, v, small),
                       hollow_attention(q, k, v, hollow_plan(family, visual, *layout[:2], *layout[3:5], 3)))


@pytest.mark.parametrize("window", [3, 8])
def test_small_blocks_gather_keys_head_major_with_the_same_numbers(window):
    """Eager small blocks gather keys and values per head ([H_kv, B * S, d]); traced graphs keep the
    row gathers (torch.compile's opaque select_rows): the same numbers, two samples, GQA, a key bias."""
    from unittest import mock

    q, k, v, family, visual = random_case(window, bidirectional=False)
    k, v = k[:, :2], v[:, :2]  # 4 query heads over 2 key heads
    layout = visual_layout(visual)
    plan = hollow_plan(family, visual, *layout[:2], *layout[3:5], window)
    assert plan.small
    bias = torch.randn(visual.shape, generator=torch.Generator().manual_seed(1))
    for key_bias in (None, bias):
        eager = hollow_attention(q, k, v, plan, enable_gqa=True, key_bias=key_bias)
        with mock.patch("torch.compiler.is_compiling", return_value=True):
            traced = hollow_attention(q, k, v, plan, enable_gqa=True, key_bias=key_bias)
        rows = family[:, 0].any(-1)[:, None, :, None].expand_as(eager)
        assert (eager - traced).abs()[rows].max().item() <= 1e-6
        want = F.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
            attn_mask=torch.where(reference_mask(family, visual, window), bias[:, None, None, :] if key_bias is not None
                                  else torch.zeros(()), torch.tensor(float("-inf"))))
        assert (eager - want).abs()[rows].max().item() <= TOL


class _Attention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _Attention()


class _PerHeadMaskDecoder(torch.nn.Module):
    """One 'layer' whose SDPA takes a per-head mask [B, H, S, S]: the blockwise path does not serve it."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer()])

    def forward(self, q, k, v, mask, visual_mask):
        return self.layers[0].self_attn(q, k, v, mask)


def test_per_head_mask_takes_the_reported_masked_fallback():
    from redlens_compile.capture.annotate import annotate_graph
    from redlens_compile.ops.hollow_attention import hollow_attention_masked

    q, k, v, family, visual = random_case(0, bidirectional=False)
    per_head = family.expand(-1, q.shape[1], -1, -1).clone()
    gm = torch.export.export(_PerHeadMaskDecoder(), (q, k, v, per_head, visual), strict=False).module()
    annotate_graph(gm)
    hollow = HollowAttentionPass(window={0: 3})
    gm, records = run_passes(gm, [hollow])
    assert records[0].modified and "per-head" in records[0].findings["fallback"][0]
    assert sum(n.target is hollow_attention_masked for n in gm.graph.nodes) == 1
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(family, visual, 3).expand_as(per_head))
    rows = family[:, 0].any(-1)[:, None, :, None].expand_as(want)
    assert (gm(q, k, v, per_head, visual) - want).abs()[rows].max().item() <= TOL
    _, again = run_passes(gm, [HollowAttentionPass(window={0: 3})])
    assert not again[0].modified
