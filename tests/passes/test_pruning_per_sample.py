"""Token pruning is a function of each sample: a left- or right-padded batch of 3 prompts of
different lengths and visual counts (one image, two images, text only) gives every sample the
logits, kept rows and greedy tokens of its own single run, for every pruning method and for a
FLOPs budget; the decoder runs no more rows than the batch's longest kept sample. The row
selection is checked against a naive per-sample loop."""

import pytest
import torch
from tiny_families import BOS, EOS, IMAGE_TOKEN, PAD

import redlens_compile as rc
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.ops.token_pruning import keep_counts, random_scores, select_rows

NEW_TOKENS = 4
KEEP = 0.25


def naive_select(visual, score, count, real):
    """One sample: real text rows and the `count` visual rows of highest score (ties: earlier row)."""
    order = sorted((i for i in range(len(visual)) if visual[i]), key=lambda i: (-float(score[i]), i))
    chosen = set(order[:count])
    return [i for i in range(len(visual)) if real[i] and (not visual[i] or i in chosen)]


def test_select_rows_matches_a_naive_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        batch, seq = 4, int(torch.randint(1, 40, (1,), generator=g))
        visual = torch.rand(batch, seq, generator=g) < 0.6
        real = torch.ones(batch, seq, dtype=torch.bool)
        for b in range(batch):  # pads on the left for even trials, on the right for odd ones
            pads = int(torch.randint(0, seq, (1,), generator=g))
            real[b, :pads] = False if trial % 2 == 0 else real[b, :pads]
            if trial % 2:
                real[b, seq - pads:] = False
        visual &= real
        score = torch.randint(0, 4, (batch, seq), generator=g).float()  # few levels: many ties
        counts = torch.stack([torch.randint(0, int(c) + 1, (1,), generator=g)[0] for c in visual.sum(1)])
        kept = select_rows(visual, score, counts, real.long())
        want = [naive_select(visual[b].tolist(), score[b], int(counts[b]), real[b].tolist()) for b in range(batch)]
        assert kept.index.shape[1] == max(1, max(len(w) for w in want))  # the longest kept sample, no more
        for b in range(batch):
            got = kept.index[b][kept.valid[b]].tolist()
            assert got == want[b]
            assert kept.valid[b].tolist() == sorted(kept.valid[b].tolist())  # left-padded


def test_random_scores_of_a_sample_ignore_its_batch_and_padding():
    g = torch.Generator().manual_seed(1)
    samples = []
    for length, n_visual in ((12, 5), (20, 9), (7, 0)):
        embeds = torch.randn(length, 8, generator=g)
        visual = torch.zeros(length, dtype=torch.bool)
        visual[2:2 + n_visual] = True
        samples.append((embeds, visual))
    alone = [random_scores(e[None], torch.ones(1, len(v)), v[None], seed=3)[0] for e, v in samples]
    assert len(set(alone[0][samples[0][1]].tolist())) == 5  # distinct draws
    seq = 24
    for left in (True, False):
        embeds = torch.randn(3, seq, 8, generator=g)  # pad rows hold anything
        visual = torch.zeros(3, seq, dtype=torch.bool)
        mask = torch.zeros(3, seq)
        for b, (e, v) in enumerate(samples):
            rows = slice(seq - len(v), seq) if left else slice(0, len(v))
            embeds[b, rows], visual[b, rows], mask[b, rows] = e, v, 1
        batched = random_scores(embeds, mask, visual, seed=3)
        for b, (e, v) in enumerate(samples):
            rows = slice(seq - len(v), seq) if left else slice(0, len(v))
            assert torch.equal(batched[b, rows], alone[b])
    # another seed or other text draws other scores
    assert not torch.equal(random_scores(samples[0][0][None], torch.ones(1, 12), samples[0][1][None], seed=4)[0],
                           alone[0])
    other = samples[0][0].clone()
    other[0] += 1.0
    assert not torch.equal(random_scores(other[None], torch.ones(1, 12), samples[0][1][None], seed=3)[0], alone[0])


def prompts(model):
    """Three llava prompts: one image, two images, text only (ids, images)."""
    g = torch.Generator().manual_seed(21)
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    size = model.config.vision_config.image_size
    words = lambda k: torch.randint(3, 90, (k,), generator=g)  # noqa: E731
    image = torch.full((n,), IMAGE_TOKEN)
    bos = torch.tensor([BOS])
    return [
        (torch.cat([bos, words(3), image, words(4)]), torch.randn(1, 3, size, size, generator=g)),
        (torch.cat([bos, words(2), image, words(2), image, words(3)]), torch.randn(2, 3, size, size, generator=g)),
        (torch.cat([bos, words(9)]), None),
    ]


def positions_of(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def single(ids, pixels):
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if pixels is not None:
        inputs["pixel_values"] = pixels
    return inputs


def batched(samples, left: bool):
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), length), PAD)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    starts = []
    for b, (ids, _) in enumerate(samples):
        start = length - len(ids) if left else 0
        input_ids[b, start:start + len(ids)], mask[b, start:start + len(ids)] = ids, 1
        starts.append(start)
    pixels = torch.cat([p for _, p in samples if p is not None])
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels}, starts


CONFIGS = {
    "random": dict(prune="random", prune_keep=KEEP, flops_budget=1.0, prune_seed=5),
    "codebook": dict(prune="codebook", prune_keep=KEEP, flops_budget=1.0),
    "fastv": dict(prune="fastv", prune_keep=KEEP, prune_layer=1, flops_budget=1.0),
    "vtw": dict(prune="vtw", prune_layer=1, flops_budget=1.0),
    "budget-0.5": dict(flops_budget=0.5),
}


@pytest.fixture(scope="module")
def optimized(family_models, tmp_path_factory):
    model = family_models("llava")
    cache = {}

    def get(name):
        if name not in cache:
            example = single(*prompts(model)[0])
            settings = dict(CONFIGS[name])
            if name == "codebook":
                dim = model.config.text_config.hidden_size
                prototypes = torch.randn(6, dim, generator=torch.Generator().manual_seed(2))
                path = tmp_path_factory.mktemp("cb") / "cb.safetensors"
                settings["codebook"] = str(Codebook(prototypes, {"model_type": model.config.model_type}).save(path))
            cache[name] = rc.optimize(model, example, config=rc.RedLensConfig(**settings))
        return cache[name]

    return model, get


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_sample_of_a_padded_batch_gets_its_own_single_run(optimized, name, left):
    model, get = optimized
    opt = get(name)
    samples = prompts(model)
    inputs, starts = batched(samples, left)
    with torch.no_grad():
        out = opt(**inputs, position_ids=positions_of(inputs["attention_mask"]))
        alone = [opt(**single(ids, p), position_ids=torch.arange(len(ids))[None]) for ids, p in samples]
    visual = [0 if p is None else int((ids == IMAGE_TOKEN).sum()) for ids, p in samples]
    for b, (ids, _) in enumerate(samples):
        if opt.pruning is None:
            rows = inputs["attention_mask"][b].bool()
            assert "kept_positions" not in out
        else:
            rows = out.kept_positions[b] >= 0
            # the same original rows (the batch shifts them by the sample's offset) as the single run
            assert torch.equal(out.kept_positions[b][rows] - starts[b], alone[b].kept_positions[0])
            kept_visual = int(keep_counts(torch.tensor([visual[b]]), 0 if name == "vtw" else KEEP)[0])
            assert alone[b].logits.shape[1] == len(ids) - visual[b] + kept_visual  # closed form
            assert rows.tolist() == sorted(rows.tolist())  # kept rows come back left-padded
        assert (out.logits[b][rows] - alone[b].logits[0]).abs().max() <= 1e-5
        assert torch.equal(out.logits[b][rows].argmax(-1), alone[b].logits[0].argmax(-1))
    # the decoder ran the batch's longest kept sample, not the longest input
    longest = max(a.logits.shape[1] for a in alone)
    assert out.logits.shape[1] == (inputs["input_ids"].shape[1] if opt.pruning is None else longest)
    if opt.pruning is not None:
        assert longest < inputs["input_ids"].shape[1]
        # the report's summary of the example (prompt 0 alone) names its kept rows
        assert opt.report.pruning["kept_rows"] == [alone[0].logits.shape[1]] == [opt.report.pruning["seq_len_after"]]
        assert out.past_key_values.get_seq_length(opt.num_layers - 1) == longest

    if left:  # generate takes left-padded prompts (as transformers' own, which warns on right padding)
        ours = opt.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=EOS)
        for b, (ids, p) in enumerate(samples):
            want = opt.generate(**single(ids, p), max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=EOS)
            assert ours[b, -NEW_TOKENS:].tolist() == want[0, -NEW_TOKENS:].tolist()
