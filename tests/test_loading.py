"""Model directories load without torchvision: the processor without its video part where the
family's whole processor cannot be built, and a clear error naming the missing backend where
even that cannot serve."""

import json

import pytest
from tiny_families import build_and_reload, make_processor

import redlens_compile as rc
from redlens_compile.loading import load_processor


def test_a_video_capable_processor_loads_without_its_video_part(tmp_path):
    model = build_and_reload("qwen2.5-vl", tmp_path)
    make_processor("qwen2.5-vl", model).save_pretrained(tmp_path)
    processor = load_processor(tmp_path)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert "video_processor" not in processor.get_attributes()
    inputs = processor(images=__import__("PIL.Image").Image.new("RGB", (64, 64)), text="w5 <|image_pad|> w6",
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64


def test_a_processor_that_needs_torchvision_is_a_clear_error(tmp_path):
    build_and_reload("mistral3", tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    with pytest.raises(rc.UnsupportedModelError, match="PixtralProcessor needs torchvision, which is not installed"):
        load_processor(tmp_path)
