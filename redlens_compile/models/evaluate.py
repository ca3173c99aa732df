"""Accuracy of a model (original or optimized) on the proof task, with greedy generate."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from .shapes_task import QA, QUESTION_TYPES, heldout_questions, prompt

Generate = Callable[..., torch.Tensor]


def encode_questions(processor: Any, images: Sequence[Image.Image], questions: Sequence[str]) -> dict:
    """Processor inputs for a batch of (image, question) in the task's prompt format, left-padded."""
    image_token = getattr(processor, "image_token", "<image>")
    # per call, not on the tokenizer: the caller's processor keeps its own padding side
    return dict(processor(images=list(images), text=[prompt(q, image_token) for q in questions],
                          padding=True, padding_side="left", return_tensors="pt"))


@torch.no_grad()
def answer_questions(
    generate: Generate, processor: Any, items: Sequence[tuple[Image.Image, QA]], batch_size: int = 25,
    progress: bool = False,
) -> list[str]:
    """The first greedily generated word for each (image, question), batched with left padding."""
    tokenizer = processor.tokenizer
    answers: list[str] = []
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc="answering", unit="batch", disable=not progress):
        chunk = items[start:start + batch_size]
        enc = encode_questions(processor, [img for img, _ in chunk], [qa.question for _, qa in chunk])
        ids = generate(**enc, max_new_tokens=1, do_sample=False)
        answers.extend(tokenizer.convert_ids_to_tokens(ids[:, -1].tolist()))
    return answers


def accuracy_by_type(items: Sequence[tuple[Image.Image, QA]], answers: Sequence[str]) -> dict[str, float]:
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for (_, qa), ans in zip(items, answers):
        total[qa.qtype] += 1
        right[qa.qtype] += int(ans == qa.answer)
    out = {t: right[t] / total[t] for t in QUESTION_TYPES if total[t]}
    out["overall"] = sum(right.values()) / max(1, sum(total.values()))
    return out


def blank_like(items: Sequence[tuple[Image.Image, QA]]) -> list[tuple[Image.Image, QA]]:
    """The same questions with the image replaced by a blank grey one (the image-blind baseline)."""
    return [(Image.new("RGB", img.size, (110, 110, 110)), qa) for img, qa in items]


def task_accuracy(model: Any, optimized: Any, processor: Any, questions: int) -> dict[str, Any]:
    """Held-out accuracy on the proof task, the original `model` against `optimized`, with greedy
    generate: {"heldout_questions", "accuracy_before", "accuracy_after"} (accuracy_by_type's dicts)."""
    items = heldout_questions(questions)
    return {
        "heldout_questions": questions,
        "accuracy_before": accuracy_by_type(items, answer_questions(model.generate, processor, items)),
        "accuracy_after": accuracy_by_type(items, answer_questions(optimized.generate, processor, items)),
    }
