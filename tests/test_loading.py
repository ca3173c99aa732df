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


def test_truncated_or_corrupt_weight_files_are_named_before_anything_loads(family_models, tmp_path):
    from redlens_compile.loading import check_weight_files, load_model_dir

    model = family_models("llava")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert check_weight_files(tmp_path) == [weights]  # a whole file passes
    whole = weights.read_bytes()
    header = 8 + int.from_bytes(whole[:8], "little")
    cases = [(whole[: len(whole) - 10], r"declares \d+ bytes of tensor data but the file holds \d+ \(truncated\)"),
             (whole[:100], r"header declares \d+ bytes of JSON but the file holds 100 bytes \(truncated\)"),
             (whole[:5], "shorter than a safetensors header"),
             (whole + b"x", r"\(trailing bytes\)"),
             (whole[:8] + b"\xff" * (header - 8) + whole[header:], "header is not JSON")]
    for data, message in cases:
        weights.write_bytes(data)
        with pytest.raises(rc.ModelFilesError, match=message):
            load_model_dir(tmp_path)
    # a shard index naming a missing shard
    weights.write_bytes(whole)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(rc.ModelFilesError, match="names weight files that are missing .model-00001-of-00002"):
        check_weight_files(tmp_path)
