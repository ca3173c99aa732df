"""LastQueryAttentionPass: layer K's attention of the last query as an extra graph output."""

import copy

import torch

from redlens_compile.ops.token_pruning import last_query_attention
from redlens_compile.passes.infra import run_passes
from redlens_compile.passes.last_query_attention import LastQueryAttentionPass
from redlens_compile.passes.selectors import clone_graph_module


def test_last_query_attention_pass_adds_one_output_equal_to_eager_attention(captured_family):
    model, example, captured = captured_family("llava")
    gm, records = run_passes(clone_graph_module(captured.graph_module), [LastQueryAttentionPass(1)])
    assert records[0].modified
    assert sum(n.target is last_query_attention for n in gm.graph.nodes) == 1
    with torch.no_grad():
        want = captured.graph_module(*captured.example.as_args())
        got = gm(*captured.example.as_args())
    assert len(got) == len(want) + 1
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # the graph's own outputs are untouched
    scores = got[-1]
    assert scores.shape == captured.example.attention_mask.shape
    # Independent reference: the original model's eager attention maps at layer 1, last row, head mean.
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager(**example, output_attentions=True).attentions[1]
    assert (scores - maps[:, :, -1, :].mean(dim=1)).abs().max() <= 1e-5
    _, again = run_passes(gm, [LastQueryAttentionPass(1)])
    assert not again[0].modified
