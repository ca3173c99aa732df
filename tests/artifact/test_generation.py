"""OptimizedModel.generate is transformers' generate with the graph's prefill: at identity it gives
the original model's tokens and scores for every decoding strategy; after pruning, beam search
equals transformers' beam search over the original decoder on the kept rows; what it cannot
serve raises before any work."""

import pytest
import torch
from tiny_families import make_inputs
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import redlens_compile as rc
from redlens_compile.artifact.generation import PrefillCache
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs

FAMILIES = ["llava", "qwen2-vl"]


def both(model, opt, inputs, seed: int | None = None, **kwargs):
    """(original, optimized) outputs of generate with the same arguments (and the same RNG state)."""
    outs = []
    for generate in (model.generate, opt.generate):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(generate(**inputs, **kwargs))
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_decoding_strategy_gives_the_original_tokens(identity_optimized, family):
    model, example, opt = identity_optimized(family)
    batch = make_inputs(family, model, text_before=5, batch=2, pad_left=(2,), seed=4)
    first = int(opt.generate(**example, max_new_tokens=1)[0, -1])
    # greedy, with the model's own first choice as the end token held off for 3 steps
    want, got = both(model, opt, example, max_new_tokens=6, min_new_tokens=3, eos_token_id=first, pad_token_id=0)
    assert torch.equal(got, want) and first not in got[0, -6:-3].tolist()
    # beam search returning 2 sequences per prompt, on a left-padded batch of 2
    want, got = both(model, opt, batch, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert got.shape == want.shape and got.shape[0] == 4
    assert torch.equal(got, want)
    # sampling with a fixed seed
    want, got = both(model, opt, batch, seed=7, max_new_tokens=6, do_sample=True, top_k=50, temperature=1.3,
                     eos_token_id=[])
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_return_dict_scores_and_logits_equal_the_original(identity_optimized, family):
    model, _, opt = identity_optimized(family)
    batch = make_inputs(family, model, batch=2, pad_left=(1,), seed=2)
    want, got = both(model, opt, batch, max_new_tokens=4, return_dict_in_generate=True, output_scores=True,
                     output_logits=True, eos_token_id=[])
    assert type(got) is type(want)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == 4
    for ours, theirs in zip(got.scores + got.logits, want.scores + want.logits):
        assert (ours - theirs).abs().max() <= 1e-4
    # beam search scores too
    want, got = both(model, opt, batch, max_new_tokens=3, num_beams=2, return_dict_in_generate=True,
                     output_scores=True)
    assert torch.equal(got.sequences, want.sequences)
    assert (got.sequences_scores - want.sequences_scores).abs().max() <= 1e-4


class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.tensor([self.token]), float("-inf"))


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def test_generation_config_logits_processor_stopping_criteria_and_streamer(identity_optimized):
    model, example, opt = identity_optimized("llava")
    first = int(opt.generate(**example, max_new_tokens=1)[0, -1])
    length = example["input_ids"].shape[1] + 3
    outs, streams = [], []
    for generate in (model.generate, opt.generate):
        streamer = Collect()
        config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=[])
        outs.append(generate(**example, generation_config=config, logits_processor=LogitsProcessorList([BanToken(first)]),
                             stopping_criteria=[StopAfter(length)], streamer=streamer))
        streams.append(streamer.chunks)
    assert torch.equal(outs[0], outs[1])
    assert outs[1].shape[1] == length and first not in outs[1][0, -3:].tolist()
    assert len(streams[1]) == len(streams[0]) == 5 and streams[1][-1] is None
    assert all(torch.equal(a, b) for a, b in zip(streams[0][:-1], streams[1][:-1]))


def test_what_the_graph_prefill_cannot_serve_raises(identity_optimized):
    model, example, opt = identity_optimized("llava")
    for option in ({"output_attentions": True, "return_dict_in_generate": True},
                   {"output_hidden_states": True, "return_dict_in_generate": True},
                   {"prefill_chunk_size": 4}, {"assistant_model": model}, {"prompt_lookup_num_tokens": 3},
                   {"cache_implementation": "static"},
                   {"generation_config": GenerationConfig(max_new_tokens=2, output_attentions=True)}):
        with pytest.raises(ValueError, match="does not serve"):
            opt.generate(**example, max_new_tokens=2, **option)
    with pytest.raises(ValueError, match="pass no cache"):
        opt.generate(**example, max_new_tokens=2, past_key_values=DynamicCache(config=model.config.text_config))
    # an argument nobody takes is transformers' error, as with the original model
    with pytest.raises(ValueError, match="max_new_token"):
        opt.generate(**example, max_new_token=2)
    assert "forward" not in vars(opt.model)  # the stand-in forward is gone after every call, raising or not


def test_beam_search_after_pruning_equals_beam_search_on_the_kept_rows(family_models):
    """Plain random pruning before layer 0: the cache holds the kept rows only (shorter than the
    prompt's mask), and beam search reorders it; the reference is transformers' beam search on the
    original model given the kept rows' embeddings and original positions."""
    model = family_models("llava")
    example = make_inputs("llava", model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune="random", prune_keep=0.25, flops_budget=1.0,
                                                              prune_proportional=False))
    inputs = make_inputs("llava", model, text_before=4, seed=9)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2)
    ours = opt.generate(**inputs, **kwargs)[:, -5:]
    decoder_inputs = capture_decoder_inputs(model, opt.adapter, inputs)
    kept = opt.pruning(decoder_inputs).kept
    rows = kept.index[0][kept.valid[0]]
    assert rows.numel() < inputs["input_ids"].shape[1]
    with torch.no_grad():
        want = model.generate(inputs_embeds=decoder_inputs.inputs_embeds[:, rows],
                              attention_mask=torch.ones(1, rows.numel(), dtype=torch.long),
                              position_ids=decoder_inputs.position_ids[:, rows], **kwargs)
    assert torch.equal(ours, want[:, -5:])


def test_prefill_cache_moves_its_masks_with_the_beams():
    kv = tuple(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 3, 2).clone() for _ in range(2))
    masks = [torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]])]
    positions = torch.tensor([[5], [6], [7], [8]])
    cache = PrefillCache(kv, None, masks, positions, uniform=True)
    cache.reorder_cache(torch.tensor([3, 3, 0, 1]))
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [3.0, 3.0, 0.0, 1.0]
    assert cache.layer_masks[0].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]]
    assert cache.positions.flatten().tolist() == [8, 8, 5, 6]
    extended = cache.append_token()
    assert extended[0][:, -1].tolist() == [1, 1, 1, 1] and cache.positions.flatten().tolist() == [9, 9, 6, 7]
