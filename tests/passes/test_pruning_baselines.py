"""The two baselines before the first layer: `downsample` (average pooling of each image's token
grid) and `diverse` (DivPrune's greedy max-min selection), checked against naive loops over rows
that share no code with the stage, for batch independence, and for their errors."""

import pytest
import torch
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.capture.decoder_inputs import DecoderInputs, capture_decoder_inputs
from redlens_compile.errors import ConfigError, PruningError
from redlens_compile.runtime.token_pruning import TokenPruning, visual_grid

DIM = 8


def inputs(samples: list[tuple[int, int, int]], seed: int) -> DecoderInputs:
    """samples: (text rows before, visual rows, text rows after), left-padded to one width."""
    g = torch.Generator().manual_seed(seed)
    width = max(sum(s) for s in samples)
    batch = len(samples)
    embeds = torch.randn(batch, width, DIM, generator=g)
    mask = torch.zeros(batch, width, dtype=torch.long)
    visual = torch.zeros(batch, width, dtype=torch.bool)
    for b, (before, vis, after) in enumerate(samples):
        start = width - before - vis - after
        mask[b, start:] = 1
        visual[b, start + before:start + before + vis] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return DecoderInputs(embeds, mask, positions, visual)


def one_sample(x: DecoderInputs, b: int) -> DecoderInputs:
    real = x.attention_mask[b].bool()
    return DecoderInputs(x.inputs_embeds[b:b + 1, real], x.attention_mask[b:b + 1, real],
                         x.position_ids[b:b + 1, real], x.visual_mask[b:b + 1, real])


def real_rows(pruned: DecoderInputs, b: int):
    real = pruned.attention_mask[b].bool()
    return pruned.inputs_embeds[b, real], pruned.position_ids[b, real], pruned.visual_mask[b, real]


def naive_pooling(x: DecoderInputs, b: int, grid, pool):
    """Sample b's rows after average pooling, by explicit loops: (embeddings, positions)."""
    rows, cols = grid
    seq = [s for s in range(x.inputs_embeds.shape[1]) if x.attention_mask[b, s]]
    visual = [s for s in seq if x.visual_mask[b, s]]
    pooled = {}  # position of a pool's first token -> mean of its tokens
    for image in range(len(visual) // (rows * cols)):
        for r0 in range(0, rows, pool):
            for c0 in range(0, cols, pool):
                members = [visual[image * rows * cols + r * cols + c]
                           for r in range(r0, min(r0 + pool, rows)) for c in range(c0, min(c0 + pool, cols))]
                total = torch.zeros(DIM)
                for m in members:
                    total = total + x.inputs_embeds[b, m]
                pooled[members[0]] = total / len(members)
    kept = [s for s in seq if not x.visual_mask[b, s] or s in pooled]
    embeds = torch.stack([pooled.get(s, x.inputs_embeds[b, s]) for s in kept])
    return embeds, torch.tensor([int(x.position_ids[b, s]) for s in kept])


@pytest.mark.parametrize("keep,grid", [(0.25, (4, 6)), (0.125, (4, 5))])  # 3x3 on 4x5: partial edge pools
def test_downsample_averages_each_pool_into_its_first_token(keep, grid):
    per_image = grid[0] * grid[1]
    x = inputs([(3, 2 * per_image, 4), (2, per_image, 6)], seed=0)  # ragged: two images and one
    pruning = TokenPruning("downsample", keep, grid=grid)
    pool = 2 if keep == 0.25 else 3
    assert pruning.pool == pool
    out = pruning(x)
    pooled = -(-grid[0] // pool) * -(-grid[1] // pool)
    assert out.visual_after.tolist() == [2 * pooled, pooled]
    for b in range(2):
        want_embeds, want_positions = naive_pooling(x, b, grid, pool)
        embeds, positions, _ = real_rows(out.inputs, b)
        assert (embeds - want_embeds).abs().max() <= 1e-6
        assert positions.tolist() == want_positions.tolist()


def naive_divprune(rows: torch.Tensor, count: int) -> list[int]:
    """DivPrune's rule by loops: cosine distance of every pair; first the row whose nearest other row
    is farthest, then repeatedly the row farthest from the picked ones (ties: the earliest)."""
    n = rows.shape[0]
    unit = [rows[i] / rows[i].norm() for i in range(n)]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda j: (sorted(dist[i][j] for i in range(n))[1], -j))
    picked = [first]
    while len(picked) < count:
        rest = [j for j in range(n) if j not in picked]
        picked.append(max(rest, key=lambda j: (min(dist[i][j] for i in picked), -j)))
    return sorted(picked)


def test_diverse_picks_what_a_loop_of_divprune_picks():
    x = inputs([(3, 40, 2), (1, 24, 5), (4, 31, 1)], seed=1)
    pruning = TokenPruning("diverse", 0.25)
    out = pruning(x)
    assert out.visual_after.tolist() == [10, 6, 8]
    for b in range(3):
        visual = x.visual_mask[b].nonzero().flatten()
        want = naive_divprune(x.inputs_embeds[b, visual], int(out.visual_after[b]))
        kept = out.kept.index[b][out.kept.valid[b]]
        kept_visual = [int(k) for k in kept if x.visual_mask[b, k]]
        assert kept_visual == [int(visual[i]) for i in want]


@pytest.mark.parametrize("pruning", [TokenPruning("diverse", 0.125, proportional=True),
                                     TokenPruning("downsample", 0.125, grid=(3, 4), proportional=True)],
                         ids=["diverse", "downsample"])
def test_a_sample_keeps_the_same_rows_alone_and_in_any_batch(pruning):
    x = inputs([(2, 24, 3), (5, 36, 1), (1, 12, 7)], seed=2)
    together = pruning(x).inputs
    for b in range(3):
        alone = pruning(one_sample(x, b)).inputs
        for got, want in zip(real_rows(together, b), real_rows(alone, 0)):
            assert torch.equal(got, want)
        real = together.attention_mask[b].bool()
        assert torch.allclose(together.key_bias[b, real], alone.key_bias[0], atol=1e-6)


def test_downsample_refuses_counts_off_the_grid_and_fractions_without_a_pool():
    with pytest.raises(PruningError, match=r"sample 1 holds 13 visual tokens, not a whole number of the 3x4"):
        TokenPruning("downsample", 0.25, grid=(3, 4))(inputs([(1, 12, 1), (1, 13, 1)], seed=3))
    with pytest.raises(ConfigError, match="0.25: 2x2"):
        rc.RedLensConfig(prune="downsample", prune_keep=0.5)
    with pytest.raises(ConfigError, match="0.25: 2x2"):
        rc.RedLensConfig(prune="downsample", prune_keep=16)


def test_the_grid_comes_from_the_model_config(family_models):
    llava = family_models("llava")
    vision = llava.config.vision_config
    assert visual_grid(llava.config) == (vision.image_size // vision.patch_size,) * 2
    with pytest.raises(ConfigError, match="varies per image"):
        visual_grid(family_models("qwen2-vl").config)
    gemma_like = type("Config", (), {"mm_tokens_per_image": 250, "vision_config": None})()
    with pytest.raises(ConfigError, match="mm_tokens_per_image=250 is not a square grid"):
        visual_grid(gemma_like)


@pytest.mark.parametrize("preset", ["downsample-0.25", "diverse-0.125"])
def test_the_presets_prune_the_tiny_model_and_count_their_work(family_models, preset):
    model = family_models("llava")
    example = make_inputs("llava", model)
    config = rc.RedLensConfig.preset(preset)
    opt = rc.optimize(model, example, config=config)
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, example)
    visual = int(decoder_inputs.visual_mask.sum())  # one 8x8 image
    summary = opt.report.pruning
    dim = model.config.text_config.hidden_size
    if config.prune == "downsample":
        assert summary["visual_after"] == [16] and summary["pool"] == 2
        assert summary["scoring_flops"] == visual * dim
    else:
        assert summary["visual_after"] == [8]
        # every pair of visual rows, then each dropped row against the kept ones (proportional attention)
        assert summary["scoring_flops"] == visual * visual * dim + (visual - 8) * 8 * dim
    assert opt.report.flops_ratio < 0.6
    tokens = opt.generate(**example, max_new_tokens=2, eos_token_id=[])
    assert tokens.shape[1] == example["input_ids"].shape[1] + 2
