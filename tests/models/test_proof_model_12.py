"""The bundled 12-layer proof model: same task, tokenizer and vision tower as the default one, a
deeper decoder, and it answers the held-out questions (scripts/train_proof_model.py --grow-from)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from redlens_compile.errors import ConfigError
from redlens_compile.models.demo import BUNDLED_MODELS, SHIPPED_MODEL_DIR, bundled_model_dir, resolve_model_dir
from redlens_compile.models.evaluate import accuracy_by_type, answer_questions
from redlens_compile.models.shapes_task import heldout_questions

QUESTIONS = 100
GOAL = 0.98  # the held-out accuracy goal for the deeper model


def test_registry_names_both_models_and_the_4_layer_one_stays_the_default():
    assert resolve_model_dir(None) == SHIPPED_MODEL_DIR == bundled_model_dir("proof_llava")
    assert resolve_model_dir("proof_llava_12") == BUNDLED_MODELS["proof_llava_12"]
    with pytest.raises(ConfigError, match="proof_llava_12"):  # the error lists the names
        bundled_model_dir("proof_llava_13")


def test_12_layer_model_shares_tokenizer_and_vision_tower_and_answers_heldout_questions():
    directory = bundled_model_dir("proof_llava_12")
    assert (directory / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    meta = json.loads((directory / "redlens_model.json").read_text())
    assert meta["weights"] == "trained" and meta["heldout_accuracy"]["overall"] >= GOAL
    grown_at = next(i for i, p in enumerate(meta["phases"]) if p.get("grow_from"))
    assert sum(p["minutes"] for p in meta["phases"][grown_at:]) < 60  # growing and tuning took under an hour

    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    base = AutoModelForImageTextToText.from_pretrained(SHIPPED_MODEL_DIR).eval()
    assert model.config.text_config.num_hidden_layers >= 12
    assert base.config.text_config.num_hidden_layers == 4
    processor = AutoProcessor.from_pretrained(directory)
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(SHIPPED_MODEL_DIR).tokenizer.get_vocab()
    base_tower = base.model.vision_tower.state_dict()
    for name, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, base_tower[name]), name  # frozen while the decoder was grown and tuned

    items = heldout_questions(QUESTIONS)
    accuracy = accuracy_by_type(items, answer_questions(model.generate, processor, items))
    # The goal less two binomial standard errors at this sample size: a model at the goal passes
    # with ~98% probability over question draws; the grown model before fine-tuning (43%) fails.
    threshold = GOAL - 2 * math.sqrt(GOAL * (1 - GOAL) / QUESTIONS)
    assert accuracy["overall"] >= threshold, (accuracy, threshold)
