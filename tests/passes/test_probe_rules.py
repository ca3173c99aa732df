"""Probe rules of the dynamic FFN against a naive reference: a Python loop over each sample's rows
that picks the probe rows, scores the channels and runs the sliced (and, with +route, the full) FFN."""

import math

import pytest
import torch
from tiny_families import ffn_output

from redlens_compile.config import PROBE_RULES, RedLensConfig
from redlens_compile.errors import ConfigError
from redlens_compile.ops.dynamic_ffn import probe_index
from redlens_compile.ops.rows import merge_rows
from redlens_compile.passes import DeadCodeEliminationPass, DynamicFFNPass, StripAssertsPass, run_passes
from redlens_compile.passes.dynamic_ffn import kept_channels
from redlens_compile.passes.selectors import clone_graph_module, ffn_of_layer


def naive_probes(rows: list[list[float]], probes, rule: str) -> list[int]:
    """The probe rows of one sample's visual rows (lists of floats), by the rule's definition."""
    n = len(rows)
    m = max(1, min(n, math.ceil(probes * n) if isinstance(probes, float) else probes))
    base = rule.split("+")[0]
    if base == "stride":
        return [j * n // m for j in range(m)]
    mean = [sum(r[d] for r in rows) / n for d in range(len(rows[0]))]
    def score(r):
        if base == "norm":
            return sum(x * x for x in r)
        return sum((x - c) ** 2 for x, c in zip(r, mean))
    return sorted(range(n), key=lambda i: -score(rows[i]))[:m]


@pytest.mark.parametrize("rule", ["stride", "norm", "outlier"])
@pytest.mark.parametrize("probes", [3, 0.3, 50])
def test_probe_index_equals_a_loop_over_rows(rule, probes):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 12, 5, generator=g)
    x[0, 4] += 6.0  # an object patch: far from its image's mean row
    counts = torch.tensor([12, 7, 1])
    index, valid = probe_index(x, counts, probes, rule)
    for b, n in enumerate(counts.tolist()):
        want = naive_probes(x[b, :n].tolist(), probes, rule)
        assert sorted(index[b][valid[b]].tolist()) == sorted(want)
    if rule == "outlier":
        assert 4 in index[0][valid[0]].tolist()


def test_a_sample_without_visual_rows_has_no_valid_probe():
    index, valid = probe_index(torch.randn(2, 4, 3), torch.tensor([4, 0]), 2, "outlier")
    assert valid[0].all() and not valid[1].any()


@pytest.mark.parametrize("rule", ["outlier", "outlier+route", "norm+route", "stride"])
def test_reduced_ffn_equals_a_naive_per_sample_reference(captured_family, rule):
    """The rewritten layer's visual rows, per sample: probes by the rule, channels by mean |act| over
    them, visual rows through the K-channel FFN; with +route the probe rows get the full FFN."""
    _, _, captured = captured_family("llava")
    gm = clone_graph_module(captured.graph_module)
    match, _ = ffn_of_layer(gm, 1)
    reader = next(iter(match.down.users))  # reads the FFN's output: after the rewrite, the merged rows
    keep, probes = 0.25, 0.25
    gm, _ = run_passes(gm, [StripAssertsPass(), DynamicFFNPass(keep={1: keep}, probe_tokens=probes, probe_rule=rule),
                            DeadCodeEliminationPass()])
    ffn = captured.decoder.language_model.layers[1].mlp
    inputs = captured.example.repeat_batch(2)
    visual = inputs.visual_mask.clone()
    visual[1, :5] = False  # ragged visual counts
    inputs.visual_mask = visual
    x = torch.randn(2, inputs.seq_len, ffn.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    x[0, int(visual[0].nonzero()[3])] *= 8  # one object row in sample 0
    merged, = (n for n in reader.all_input_nodes if n.target is merge_rows)
    out = ffn_output(gm, match.entry, merged, x, inputs.as_args())
    with torch.no_grad():
        act = torch.nn.functional.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)
        full = act @ ffn.down_proj.weight.T
    width = ffn.down_proj.weight.shape[1]
    k = kept_channels(keep, width)
    for b in range(2):
        positions = visual[b].nonzero().reshape(-1).tolist()
        rows = [x[b, p].tolist() for p in positions]
        chosen = naive_probes(rows, probes, rule)
        scores = [sum(abs(float(act[b, positions[i], c])) for i in chosen) for c in range(width)]
        channels = sorted(range(width), key=lambda c: -scores[c])[:k]
        for i, p in enumerate(positions):
            if rule.endswith("+route") and i in chosen:
                want = full[b, p]
            else:
                want = act[b, p, channels] @ ffn.down_proj.weight[:, channels].T
            assert (out[b, p] - want).abs().max().item() <= 1e-4
    if rule.endswith("+route"):
        assert (out[visual] - full[visual]).abs().max() > 1e-3  # the rest of the rows are still reduced


def test_probe_rule_is_validated():
    assert RedLensConfig(probe_rule="stride").probe_rule == "stride"
    assert set(PROBE_RULES) >= {"stride", "norm", "outlier", "outlier+route"}
    with pytest.raises(ConfigError, match="probe_rule='kcenter'"):
        RedLensConfig(probe_rule="kcenter")
    assert RedLensConfig.from_json(RedLensConfig(probe_rule="norm").to_json()).probe_rule == "norm"
