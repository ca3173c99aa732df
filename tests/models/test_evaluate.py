"""models/evaluate.py task_accuracy, called from Python: the original and the optimized side are
each the model given (an answer oracle scores 1, a model that never answers scores 0)."""

import torch

from redlens_compile.models.evaluate import task_accuracy
from redlens_compile.models.shapes_task import QUESTION_TYPES, heldout_questions

QUESTIONS = 6


class _Fixed:
    """Answers each question with the token `answer(qa)` (in the order task_accuracy asks them)."""

    def __init__(self, tokenizer, answer):
        self.tokens = [tokenizer.convert_tokens_to_ids(answer(qa)) for _, qa in heldout_questions(QUESTIONS)]

    def generate(self, input_ids, max_new_tokens, **kwargs):
        rows = input_ids.shape[0]
        answers, self.tokens = self.tokens[:rows], self.tokens[rows:]
        return torch.cat([input_ids, torch.tensor(answers)[:, None]], dim=1)


def test_task_accuracy_scores_each_side_on_its_own_answers():
    from redlens_compile.loading import load_processor
    from redlens_compile.models import PROOF_MODEL_DIR

    processor = load_processor(PROOF_MODEL_DIR)
    oracle, mute = (_Fixed(processor.tokenizer, lambda qa: qa.answer),
                    _Fixed(processor.tokenizer, lambda qa: "<pad>"))
    got = task_accuracy(oracle, mute, processor, QUESTIONS)
    assert got["heldout_questions"] == QUESTIONS
    asked = {qa.qtype for _, qa in heldout_questions(QUESTIONS)}
    assert got["accuracy_before"] == {**{t: 1.0 for t in QUESTION_TYPES if t in asked}, "overall": 1.0}
    assert got["accuracy_after"] == {**{t: 0.0 for t in QUESTION_TYPES if t in asked}, "overall": 0.0}
