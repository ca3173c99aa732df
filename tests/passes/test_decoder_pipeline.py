"""The cleanup passes on a real exported decoder: asserts gone, numbers unchanged, idempotent."""

import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.passes import DeadCodeEliminationPass, StripAssertsPass, run_passes
from redlens_compile.passes.strip_asserts import ASSERT_TARGETS


def test_cleanup_on_llava_decoder(family_models):
    model = family_models("llava")
    captured = rc.capture_decoder(model, make_inputs("llava", model))
    gm = captured.graph_module
    args = captured.example.as_args()
    with torch.no_grad():
        eager = captured.decoder(*args)
    before = sum(1 for n in gm.graph.nodes if n.target in ASSERT_TARGETS)
    assert before > 0
    gm, records = run_passes(gm, [StripAssertsPass(), DeadCodeEliminationPass()])
    assert records[0].modified
    assert sum(1 for n in gm.graph.nodes if n.target in ASSERT_TARGETS) == 0
    with torch.no_grad():
        out = gm(*args)
    assert len(out) == len(eager)
    for a, b in zip(out, eager):
        assert (a - b).abs().max().item() <= 1e-6
    _, again = run_passes(gm, [StripAssertsPass(), DeadCodeEliminationPass()])
    assert not any(r.modified for r in again)
