"""The passes' declared order (runs_after / runs_last) is checked before any pass runs, and what a
pass finds comes back in its result, not on the pass object."""

import pytest

from redlens_compile.analysis.budget import LayerSettings, ReductionPlan
from redlens_compile.errors import PassOrderError
from redlens_compile.passes.causal_fast_path import CausalFastPathPass
from redlens_compile.passes.dead_code import DeadCodeEliminationPass
from redlens_compile.passes.hollow_attention import HollowAttentionPass
from redlens_compile.passes.infra import check_order, run_passes
from redlens_compile.passes.key_bias import KeyBiasPass
from redlens_compile.passes.last_query_attention import LastQueryAttentionPass
from redlens_compile.passes.pipeline import build_passes
from redlens_compile.passes.selectors import clone_graph_module
from redlens_compile.passes.strip_asserts import StripAssertsPass


def test_build_passes_lists_them_in_their_declared_order():
    plan = ReductionPlan(settings={0: LayerSettings(ffn_keep=0.5, window=4)})
    passes = build_passes(plan, 0.25, key_bias=True, thin_linear=True, last_query_layer=1)
    check_order(passes)  # no error
    assert [p.name for p in passes] == ["StripAssertsPass", "LastQueryAttentionPass", "DynamicFFNPass",
                                        "HollowAttentionPass", "KeyBiasPass", "CausalFastPathPass", "ThinLinearPass",
                                        "DeadCodeEliminationPass"]


@pytest.mark.parametrize("passes, first, then", [
    ([StripAssertsPass(), KeyBiasPass(), HollowAttentionPass(window={0: 4})], "KeyBiasPass", "HollowAttentionPass"),
    ([StripAssertsPass(), CausalFastPathPass(), LastQueryAttentionPass(1)], "CausalFastPathPass",
     "LastQueryAttentionPass"),
    ([HollowAttentionPass(window={0: 4}), StripAssertsPass()], "HollowAttentionPass", "StripAssertsPass"),
    ([DeadCodeEliminationPass(), CausalFastPathPass()], "DeadCodeEliminationPass", "CausalFastPathPass"),
])
def test_a_wrong_order_raises_before_any_pass_runs(captured_family, passes, first, then):
    _, _, captured = captured_family("llava")
    gm = clone_graph_module(captured.graph_module)
    nodes = len(gm.graph.nodes)
    with pytest.raises(PassOrderError, match=f"{first} is listed before {then}|{first} runs last"):
        run_passes(gm, passes)
    assert len(gm.graph.nodes) == nodes  # nothing ran


def test_findings_come_back_in_the_result_and_the_pass_keeps_none(captured_family):
    _, _, captured = captured_family("llava")
    hollow = HollowAttentionPass(window={0: 4, 99: 4})  # layer 99 does not exist: skipped
    gm, records = run_passes(clone_graph_module(captured.graph_module), [StripAssertsPass(), hollow])
    assert records[1].findings["skipped"] == {99: "layer 99: no single SDPA call found"}
    assert records[1].findings["fallback"] == {}
    assert vars(hollow) == {"window": {0: 4, 99: 4}}  # no state left on the pass
    _, again = run_passes(gm, [hollow])  # a second run reports its own findings only
    assert not again[0].modified and again[0].findings["skipped"] == {99: "layer 99: no single SDPA call found"}
