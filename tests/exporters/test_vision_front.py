"""The ONNX front (vision graph per image, embedding graph, merge and positions in numpy): equal to
the family's own code where it is exported, and left to torch, with the reason, where the check
at another image count fails or the family needs its own position rule."""

import json

import numpy as np
import pytest
import torch
from tiny_families import build_and_reload, make_inputs

import redlens_compile as rc
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.exporters.ort_runner import OnnxRunner
from redlens_compile.exporters.vision_front import doubled, generation_positions, image_input_names, images_in


def test_front_equals_the_family_code_on_images_it_was_not_exported_with(identity_optimized, tmp_path):
    model, _, opt = identity_optimized("llava")
    out = opt.export_onnx(tmp_path / "onnx")
    manifest = json.loads((out / "redlens.json").read_text())
    assert manifest["front"] == {"runs_in": "onnxruntime", "image_inputs": ["pixel_values"], "why": None}
    assert manifest["graphs"]["vision"]["per_image"] is True
    runner = OnnxRunner(out)
    # three prompts of another length, three other images, left padding
    inputs = make_inputs("llava", model, text_before=9, text_after=2, batch=3, pad_left=(3, 1), seed=11)
    got = runner.front(inputs)
    want = capture_decoder_inputs(model, opt.adapter, inputs)
    assert float((got.inputs_embeds - want.inputs_embeds).abs().max()) <= 1e-5
    for field in ("attention_mask", "position_ids", "visual_mask"):
        assert torch.equal(getattr(got, field), getattr(want, field))
    # numpy inputs serve as well as torch tensors
    as_numpy = {k: v.numpy() for k, v in inputs.items()}
    assert torch.equal(runner.front(as_numpy).inputs_embeds, got.inputs_embeds)


def test_a_vision_graph_that_depends_on_the_image_count_stays_in_torch(tmp_path):
    """A family whose features change with the number of images in the call: the graph exported for
    one image is right on the example and wrong on two, so the export keeps the vision part in torch."""
    model = build_and_reload("llava", tmp_path / "model")
    inner = model.model
    original = inner.get_image_features

    def by_count(pixel_values, **kwargs):
        out = original(pixel_values, **kwargs)
        out.pooler_output = [f * pixel_values.shape[0] for f in out.pooler_output]
        return out

    inner.get_image_features = by_count
    example = make_inputs("llava", model)
    opt = rc.optimize(model, example, config=rc.RedLensConfig.identity())
    out = opt.export_onnx(tmp_path / "onnx")
    front = json.loads((out / "redlens.json").read_text())["front"]
    assert front["runs_in"] == "torch" and "the example doubled" in front["why"]
    assert not list(out.glob("vision.onnx*"))
    with pytest.raises(rc.ExportError, match="pass the model the files were exported from"):
        OnnxRunner(out)
    runner = OnnxRunner(out, model)
    batch = make_inputs("llava", model, batch=2, pad_left=(1,), seed=4)
    want = opt.generate(**batch, max_new_tokens=4, eos_token_id=[], do_sample=False)
    assert torch.equal(runner.generate(batch, max_new_tokens=4, eos_token_id=[]), want)


def test_m_rope_families_name_why_the_front_runs_in_torch(identity_optimized, tmp_path):
    model, _, opt = identity_optimized("qwen2-vl")
    out = opt.export_onnx(tmp_path / "onnx")
    with pytest.raises(rc.ExportError, match="3 rows \\(M-RoPE\\)"):
        OnnxRunner(out)


def test_helpers(identity_optimized):
    model, example, _ = identity_optimized("llava")
    assert image_input_names(model, example) == ["pixel_values"]
    assert images_in(doubled(example), ["pixel_values"]) == 2
    assert images_in({"a": torch.zeros(2, 3), "b": torch.zeros(3)}, ["a", "b"]) is None
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    rule = model._prepare_position_ids_for_generation(torch.from_numpy(mask), {"attention_mask": torch.from_numpy(mask)})
    assert np.array_equal(generation_positions(mask), rule.numpy())


def test_image_tokens_without_their_images_are_named(identity_optimized, tmp_path):
    model, example, opt = identity_optimized("llava")
    runner = OnnxRunner(opt.export_onnx(tmp_path / "onnx"))
    with pytest.raises(rc.ExportError, match=r"image inputs \['pixel_values'\]"):
        runner.front({k: v for k, v in example.items() if k != "pixel_values"})
    ids = example["input_ids"].clone()
    ids[0, int((ids[0] == model.config.image_token_id).nonzero()[0])] = 5  # one placeholder fewer
    fewer = dict(example, input_ids=ids)
    with pytest.raises(rc.ExportError, match="image tokens but its images give"):
        runner.front(fewer)
    # images of another size than the vision graph was exported for: named, not an onnxruntime shape error
    larger = dict(example, pixel_values=torch.zeros(1, 3, 48, 48))
    with pytest.raises(rc.ExportError, match=r"exported for \[3, 32, 32\] per image"):
        runner.front(larger)


@pytest.mark.parametrize("family", ["internvl", "idefics3"])
def test_other_families_whose_vision_exports_run_from_the_folder_alone(identity_optimized, family, tmp_path):
    model, _, opt = identity_optimized(family)
    runner = OnnxRunner(opt.export_onnx(tmp_path / "onnx"))
    assert "vision" in runner.sessions
    batch = make_inputs(family, model, text_before=6, batch=2, pad_left=(2,), seed=9)
    with torch.no_grad():
        want = opt(**batch).logits.numpy()
    real = batch["attention_mask"].bool().numpy()
    assert np.abs(runner(**batch) - want)[real].max() <= 1e-4
    ours = opt.generate(**batch, max_new_tokens=4, eos_token_id=[], do_sample=False)
    assert torch.equal(runner.generate(batch, max_new_tokens=4, eos_token_id=[]), ours)
