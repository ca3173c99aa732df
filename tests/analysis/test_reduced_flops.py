"""Less work, counted: the audit of a reduced model equals the closed form of what it computes."""

import math

import pytest
import torch
from conftest import ALL_FAMILIES
from tiny_families import IMAGE_TOKEN, VIDEO_TOKEN, make_inputs

import redlens_compile as rc


def text_config(model):
    return model.get_decoder().config if hasattr(model, "get_decoder") else model.config.text_config


def closed_form_reduced(cfg, visual: torch.Tensor, keep: float, probes: float, window: int, rule: str = "stride") -> dict:
    """Multiply-adds of one reduced layer for one sequence, by group and token kind (DESIGN.md)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    n_v, n_t = int(visual.sum()), int((~visual).sum())
    k = math.ceil(keep * f)
    m = min(n_v, math.ceil(probes * n_v))
    # choosing the probes: one multiply-add per visual element to score a row ("norm"), two with the
    # image's mean ("outlier"); the channels' scores: one per probe activation; "+route": the probes'
    # full-width hidden through the whole down weight
    base, _, route = rule.partition("+")
    selection = {"stride": 0, "norm": 1, "outlier": 2}[base] * n_v * d + m * f + (m * d * f if route else 0)
    # Hollow attention as computed (DESIGN.md: O(N_v (P + 2w))): the visual span is cut into blocks
    # of c = ceil(w / 2) queries; a block computes its text keys (those before the image: P) and a
    # run of visual keys reaching w - 1 back, ceil((w - 1) / c) blocks plus its own.
    c = min(n_v, math.ceil(window / 2))
    blocks = math.ceil(n_v / c)
    behind = min(math.ceil((window - 1) / c), blocks - 1)
    first_visual = int(visual.nonzero()[0])
    hollow_keys = blocks * c * (first_visual + (behind + 1) * c)
    # text queries as the family's SDPA counts them: the query at position i sees i + 1 keys
    text_keys = int(((~visual).nonzero().reshape(-1) + 1).sum())
    return {
        "visual": {"proj": n_v * d * (2 * q_dim + 2 * kv_dim), "attn": 2 * q_dim * hollow_keys,
                   # sliced gate/up/down + full-width probe up to down
                   "ffn": 3 * n_v * d * k + 2 * m * d * f + selection},
        "text": {"proj": n_t * d * (2 * q_dim + 2 * kv_dim), "attn": 2 * q_dim * text_keys, "ffn": 3 * n_t * d * f},
    }


@pytest.mark.parametrize("family, rule", [(f, rc.RedLensConfig().probe_rule) for f in ALL_FAMILIES]
                         + [("llava", "stride"), ("llava", "norm"), ("llava", "outlier+route")])
def test_reduced_audit_matches_closed_form_within_two_percent(family_models, family, rule):
    model = family_models(family)
    inputs = make_inputs(family, model, text_before=5, text_after=6)
    keep, probes, window = 0.375, 0.25, 5
    config = rc.RedLensConfig(layers=[0, 2], ffn_keep=keep, probe_tokens=probes, hollow_window=window, probe_rule=rule)
    report = rc.optimize(model, inputs, config=config).report
    cfg = text_config(model)
    visual = torch.isin(inputs["input_ids"][0], torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN]))
    expected = closed_form_reduced(cfg, visual, keep, probes, window, rule)
    for row in report.layers:
        for kind in ("visual", "text"):
            for group in ("proj", "attn", "ffn"):
                got = row["after"][group][kind]
                want = expected[kind][group] if row["layer"] in (0, 2) else row["before"][group][kind]
                assert abs(got - want) <= 0.02 * want, (row["layer"], kind, group, got, want)
    assert report.chosen_layers == [0, 2]
    assert report.flops_ratio < 1.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_budget_half_lands_in_range(family_models, family):
    model = family_models(family)
    report = rc.optimize(model, make_inputs(family, model), config=rc.RedLensConfig(flops_budget=0.5)).report
    assert 0.45 <= report.flops_ratio <= 0.50, report.plan["steps"]
    assert report.plan["predicted_ratio"] == pytest.approx(report.flops_ratio, rel=1e-9)
    assert report.ranking["metric"] == "jsd" and sorted(report.ranking["order"]) == list(range(len(report.layers)))
    # The least critical layer is reduced at least as hard as any other (tightened first).
    settings = report.plan["settings"]
    first = settings[str(report.ranking["order"][0])]["ffn_keep"]
    assert all(first <= s["ffn_keep"] for s in settings.values())
