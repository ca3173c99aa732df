"""OptimizedModel.forward serves labels and logits_to_keep as the family does and refuses what it
cannot serve; generate leaves the user's model untouched, so threads can generate on one model."""

import threading

import pytest
import torch
from tiny_families import IMAGE_TOKEN, make_inputs

import redlens_compile as rc
from redlens_compile.artifact.forward_options import IGNORE_INDEX
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs


def _labels(inputs):
    return torch.where(inputs["input_ids"] == IMAGE_TOKEN, IGNORE_INDEX, inputs["input_ids"])


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_labels_and_logits_to_keep_as_the_family_serves_them(identity_optimized, family):
    model, _, opt = identity_optimized(family)
    inputs = make_inputs(family, model, batch=2, pad_left=(2,), seed=3)
    labels = _labels(inputs)
    with torch.no_grad():
        want = model(**inputs, labels=labels)
    got = opt(**inputs, labels=labels)
    assert got.loss is not None and abs(float(got.loss) - float(want.loss)) <= 1e-5
    seq = inputs["input_ids"].shape[1]
    for keep in (1, 3, torch.tensor([0, 5, seq - 1])):
        with torch.no_grad():
            ref = model(**inputs, logits_to_keep=keep).logits
        out = opt(**inputs, logits_to_keep=keep).logits
        assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    assert isinstance(opt(**inputs, return_dict=False), tuple)


def test_what_forward_cannot_serve_is_refused_naming_it(identity_optimized):
    model, inputs, opt = identity_optimized("llava")
    for extra, name in [({"output_hidden_states": True}, "output_hidden_states"),
                        ({"output_attentions": True}, "output_attentions"),
                        ({"temperature": 0.5}, "temperature"), ({"labls": inputs["input_ids"]}, "labls"),
                        ({"past_key_values": object()}, "past_key_values")]:
        with pytest.raises(rc.InputError, match=rf"does not serve {name} \("):
            opt(**inputs, **extra)


def test_pruned_forward_maps_labels_and_positions_to_the_kept_rows(family_models):
    model = family_models("llava")
    inputs = make_inputs("llava", model, seed=5)
    labels = _labels(inputs)
    # keeping every visual row: the same rows as the original, so the same loss
    whole = rc.optimize(model, inputs, config=rc.RedLensConfig(prune="random", prune_keep=1.0,
                                                                prune_proportional=False, flops_budget=1.0))
    with torch.no_grad():
        want = model(**inputs, labels=labels).loss
    assert abs(float(whole(**inputs, labels=labels).loss) - float(want)) <= 1e-5

    opt = rc.optimize(model, inputs, config=rc.RedLensConfig(prune="random", prune_keep=0.25, flops_budget=1.0))
    out = opt(**inputs, labels=labels)
    # the loss by hand: each kept row predicts the label of the next kept row (text rows are all kept)
    prefill = opt.run_decoder(capture_decoder_inputs(model, opt.adapter, inputs))
    index = prefill.kept.index[0].tolist()
    terms = [torch.nn.functional.cross_entropy(out.logits[0, r].float(), labels[0, index[r + 1]], reduction="sum")
             for r in range(len(index) - 1) if labels[0, index[r + 1]] != IGNORE_INDEX]
    assert abs(float(out.loss) - float(sum(terms) / len(terms))) <= 1e-5
    # the last 2 positions (text) are the last 2 kept rows; a dropped visual position is refused
    assert torch.equal(opt(**inputs, logits_to_keep=2).logits, out.logits[:, -2:])
    dropped = sorted(set(range(inputs["input_ids"].shape[1])) - set(index))[0]
    with pytest.raises(rc.InputError, match=f"asks for position {dropped} of sample 0, a visual row"):
        opt(**inputs, logits_to_keep=torch.tensor([dropped]))
    bad = labels.clone()
    bad[0, dropped] = 7
    with pytest.raises(rc.InputError, match=f"sample 0, position {dropped}\\): set labels there to -100"):
        opt(**inputs, labels=bad)


def test_two_threads_generating_on_one_model_get_their_own_tokens(identity_optimized):
    model, _, opt = identity_optimized("llava")
    prompts = [make_inputs("llava", model, seed=s, text_after=3 + s) for s in (11, 12)]
    alone = [opt.generate(**p, max_new_tokens=6, do_sample=False) for p in prompts]
    forward_before = model.forward
    results: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):  # several rounds so the calls overlap
                results[i].append(opt.generate(**prompts[i], max_new_tokens=6, do_sample=False))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 3 and all(torch.equal(ids, alone[i]) for ids in results[i])
    assert not torch.equal(alone[0][:, -6:], alone[1][:, -6:])  # the prompts do generate different tokens
    assert model.forward == forward_before and "forward" not in vars(model)
