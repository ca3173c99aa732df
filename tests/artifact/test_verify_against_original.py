"""artifact/verify.py: the optimized model against the original, called from Python (what the CLI's
optimize and demo print). Each number is checked against a closed form on models whose difference
from the original is known."""

import copy

import pytest
import torch

from redlens_compile.artifact.verify import compare, token_agreement

NEW_TOKENS = 3


class _Shifted:
    """The model with a known change: `shift` added to one logit of every row, `drop_first` rows cut
    off (as pruning does), and generate's last token replaced by another id."""

    def __init__(self, model, shift=0.0, drop_first=0, change_last_token=False):
        self.model, self.shift, self.drop_first, self.change_last_token = model, shift, drop_first, change_last_token

    def __call__(self, **inputs):
        out = copy.copy(self.model(**inputs))
        logits = out.logits.clone()
        logits[..., 0] += self.shift
        out.logits = logits[:, self.drop_first:]
        return out

    def generate(self, **kwargs):
        ids = self.model.generate(**kwargs).clone()
        if self.change_last_token:
            ids[:, -1] = (ids[:, -1] + 1) % self.model.config.text_config.vocab_size
        return ids


def test_token_agreement_counts_positions_of_the_longer_sequence():
    ref = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert token_agreement(ref, torch.tensor([[1, 9, 3], [4, 5, 6]])) == (5, 6)
    assert token_agreement(ref, torch.tensor([[1, 2], [4, 0]])) == (3, 6)  # stopped early: missing counts as different


def test_the_identity_model_matches_and_the_report_gets_the_measurements(identity_optimized):
    model, example, opt = identity_optimized("llava")
    report = copy.deepcopy(opt.report)
    checked = compare(model, opt, example, max_new_tokens=NEW_TOKENS, repeats=1)
    rows = example["input_ids"].shape[0]
    assert checked.last_position_max_abs_logit_diff <= 1e-5 and checked.all_rows_max_abs_logit_diff <= 1e-5
    assert checked.greedy_next_token_agreement == 1.0 and checked.generated_tokens_equal
    assert checked.generated_ids_after.shape == (rows, NEW_TOKENS)
    assert (checked.generated_tokens_matching, checked.generated_tokens_compared) == (rows * NEW_TOKENS,) * 2
    assert checked.prefill_latency_s_before > 0 and checked.prefill_latency_s_after > 0
    checked.record(report)
    got = report.measurements
    assert got["logits"]["last_position_max_abs_diff"] == checked.last_position_max_abs_logit_diff
    assert got["generate"]["tokens_compared"] == rows * NEW_TOKENS and got["prefill_latency_s"]["repeats"] == 1


def test_a_known_difference_is_measured_as_that_difference(family_models):
    from tiny_families import make_inputs

    model = family_models("llava")
    example = make_inputs("llava", model)
    rows = example["input_ids"].shape[0]
    shifted = compare(model, _Shifted(model, shift=0.25, change_last_token=True), example,
                      max_new_tokens=NEW_TOKENS, repeats=1)
    assert shifted.last_position_max_abs_logit_diff == pytest.approx(0.25, abs=1e-5)
    assert shifted.all_rows_max_abs_logit_diff == pytest.approx(0.25, abs=1e-5)
    assert not shifted.generated_tokens_equal
    assert (shifted.generated_tokens_matching, shifted.generated_tokens_compared) == \
        (rows * (NEW_TOKENS - 1), rows * NEW_TOKENS)
    # rows dropped (token pruning): every row's difference is not defined, the last position's is
    pruned = compare(model, _Shifted(model, shift=-0.5, drop_first=2), example, max_new_tokens=1, repeats=1)
    assert pruned.all_rows_max_abs_logit_diff is None
    assert pruned.last_position_max_abs_logit_diff == pytest.approx(0.5, abs=1e-5)
