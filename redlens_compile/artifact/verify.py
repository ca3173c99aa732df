"""An optimized model checked against the model it came from, on the same inputs.

What `redlens-compile optimize` and `demo` measure, callable from Python: prefill latency
(interleaved medians of the whole model), the logits (the last position, what generate reads,
and every row where the sequence is unchanged), the greedy next token, and greedy generate
token by token. `Comparison.record` puts it into the audit report's measurements.

Takes any callables with the transformers interface (`model(**inputs).logits`,
`model.generate(...)`): the optimized model is not imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..analysis.timing import interleaved_medians


@dataclass
class Comparison:
    """The original (before) against the optimized model (after) on one example."""

    prefill_latency_s_before: float
    prefill_latency_s_after: float
    repeats: int
    last_position_max_abs_logit_diff: float
    # None where token pruning drops rows (every row is then not defined)
    all_rows_max_abs_logit_diff: float | None
    greedy_next_token_agreement: float  # fraction of rows whose last-position argmax is the same
    max_new_tokens: int
    generated_ids_before: torch.Tensor  # [B, new tokens], the prompt cut off
    generated_ids_after: torch.Tensor
    generated_tokens_equal: bool  # the whole sequences, prompt included
    generated_tokens_matching: int
    generated_tokens_compared: int
    generated_before: str | None = None  # the first row decoded, where a tokenizer was given
    generated_after: str | None = None

    def does_not_pay(self, flops_ratio: float) -> str | None:
        """The measured verdict when the optimized prefill is slower than the original on this machine."""
        before, after = self.prefill_latency_s_before, self.prefill_latency_s_after
        if after <= before or flops_ratio >= 1.0:
            return None
        return (f"reductions do not pay on this model: prefill {after * 1e3:.1f} ms vs {before * 1e3:.1f} ms "
                f"(measured, interleaved) because the FLOPs they save (ratio {flops_ratio:.3f}) cost less than the "
                "per-op dispatch the rewritten graph adds on a decoder this small; the original model is the faster "
                "choice here")

    def record(self, report: Any) -> None:
        """The measurements into `report` (an AuditReport): prefill_latency_s, logits, generate."""
        verdict = self.does_not_pay(report.flops_ratio)
        how = f"median of {self.repeats} interleaved runs, whole model, this machine"
        report.add_measurements(
            prefill_latency_s={"before": self.prefill_latency_s_before, "after": self.prefill_latency_s_after,
                               "repeats": self.repeats, "how": how + (f"; {verdict}" if verdict else "")},
            logits={"last_position_max_abs_diff": self.last_position_max_abs_logit_diff,
                    "all_rows_max_abs_diff": self.all_rows_max_abs_logit_diff,
                    "greedy_next_token_agreement": self.greedy_next_token_agreement},
            generate={"max_new_tokens": self.max_new_tokens, "tokens_equal": self.generated_tokens_equal,
                      "tokens_matching": self.generated_tokens_matching,
                      "tokens_compared": self.generated_tokens_compared,
                      "before": self.generated_before, "after": self.generated_after})


def token_agreement(ref: torch.Tensor, opt: torch.Tensor) -> tuple[int, int]:
    """Generated tokens at the same position that are the same, and the positions compared (the
    longer of the two per row: a sequence that stops early counts its missing tokens as different)."""
    length = max(ref.shape[1], opt.shape[1])
    same = min(ref.shape[1], opt.shape[1])
    return int((ref[:, :same] == opt[:, :same]).sum()), int(ref.shape[0] * length)


def compare(model: Any, optimized: Any, inputs: Mapping[str, Any], max_new_tokens: int = 8, repeats: int = 20,
            tokenizer: Any = None) -> Comparison:
    """`optimized` against `model` on `inputs`: latency over `repeats` interleaved prefills, logits,
    and `max_new_tokens` greedy tokens (decoded with `tokenizer` where given)."""
    with torch.no_grad():
        latency = interleaved_medians({"before": lambda: model(**inputs), "after": lambda: optimized(**inputs)},
                                      repeats)
        ref_logits, opt_logits = model(**inputs).logits, optimized(**inputs).logits
        # generate reads the last position only; every row (visual rows included) is kept apart, and
        # is not defined where token pruning drops rows
        last_diff = (ref_logits[:, -1] - opt_logits[:, -1]).abs().max().item()
        all_rows_diff = (ref_logits - opt_logits).abs().max().item() if ref_logits.shape == opt_logits.shape else None
        agreement = (ref_logits[:, -1].argmax(-1) == opt_logits[:, -1].argmax(-1)).float().mean().item()
        ref_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    opt_ids = optimized.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    before, after = ref_ids[:, prompt_len:], opt_ids[:, prompt_len:]
    matching, compared = token_agreement(before, after)
    return Comparison(
        prefill_latency_s_before=latency["before"], prefill_latency_s_after=latency["after"], repeats=repeats,
        last_position_max_abs_logit_diff=last_diff, all_rows_max_abs_logit_diff=all_rows_diff,
        greedy_next_token_agreement=agreement, max_new_tokens=max_new_tokens,
        generated_ids_before=before, generated_ids_after=after,
        generated_tokens_equal=bool(torch.equal(ref_ids, opt_ids)),
        generated_tokens_matching=matching, generated_tokens_compared=compared,
        generated_before=tokenizer.decode(before[0]) if tokenizer is not None else None,
        generated_after=tokenizer.decode(after[0]) if tokenizer is not None else None)
