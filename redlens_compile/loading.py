"""Load a saved model directory (model + processor) without what an image prompt does not need.

The processors of video-capable families (Qwen2-VL, InternVL, ...) hold a video processor that
transformers builds on torchvision; torchvision is not a dependency (and the registry's wheel
does not import with the CPU torch). An image prompt needs only the image processor and the
tokenizer, so when the family's processor cannot be built whole, the same processor class is
built from those parts, the video part left out, and anything else missing is named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import ModelFilesError, UnsupportedModelError
from .files import safetensors_problem

logger = logging.getLogger(__name__)

_VIDEO_ATTRIBUTES = ("video_processor",)


def _processor_class_name(path: Path) -> str | None:
    """The processor class the directory names (processor_config.json, then tokenizer_config.json)."""
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        try:
            found = json.loads((path / name).read_text()).get("processor_class")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if found:
            return found
    return None


def _processor_class(path: Path):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = _processor_class_name(path)
    if name is None:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UnsupportedModelError(f"{path}: no processor class found (processor_config.json names none, and "
                                    "the model type has no processor in transformers); save the processor with "
                                    "processor.save_pretrained into the model directory")
    return cls


def image_only_processor_class(processor_cls: type) -> type:
    """`processor_cls` with its video attributes dropped: transformers loads and checks the rest."""
    attributes = [a for a in processor_cls.get_attributes() if a not in _VIDEO_ATTRIBUTES]

    class ImageOnly(processor_cls):
        @classmethod
        def get_attributes(cls):
            return list(attributes)

    # saved configs keep naming the family's class, so AutoProcessor reloads them elsewhere
    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_cls.__name__
    return ImageOnly


def load_processor(model_dir: str | Path) -> Any:
    """AutoProcessor, or, where its video part cannot be built here, the image-only processor."""
    from transformers import AutoProcessor

    path = Path(model_dir)
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, OSError, ValueError, TypeError) as exc:
        whole_error = exc
    processor_cls = _processor_class(path)
    backends = getattr(processor_cls, "_backends", None)  # transformers' placeholder for a class it cannot build
    if backends:
        raise UnsupportedModelError(
            f"{path}: {processor_cls.__name__} needs {', '.join(backends)}, which is not installed (the CPU torch "
            "here has no matching torchvision); install it, or build the inputs with the family's image processor "
            "and tokenizer and use the Python API") from whole_error
    if not set(_VIDEO_ATTRIBUTES) & set(processor_cls.get_attributes()):
        raise UnsupportedModelError(f"{path}: the processor does not load ({type(whole_error).__name__}: "
                                    f"{whole_error})") from whole_error
    logger.info("%s: the video processor cannot be built here (%s); loading the image processor and tokenizer only",
                processor_cls.__name__, whole_error)
    try:
        return image_only_processor_class(processor_cls).from_pretrained(path)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{path}: {processor_cls.__name__} does not load: whole ({whole_error}), and without its video "
            f"part ({type(exc).__name__}: {exc}); check the directory holds the image processor and tokenizer "
            "files processor.save_pretrained writes") from exc


_SHARD_INDEX = "model.safetensors.index.json"


def check_weight_files(model_dir: str | Path) -> list[Path]:
    """The directory's safetensors weight files, each checked whole (header and declared data size
    against the file size) before anything loads: a truncated or corrupt file is a ModelFilesError
    naming it, not a loader traceback. Returns the files."""
    path = Path(model_dir)
    index = path / _SHARD_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFilesError(f"{index}: not a readable shard index ({exc}); save the model again "
                                  "with save_pretrained") from exc
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise ModelFilesError(f"{path}: {_SHARD_INDEX} names weight files that are missing ({', '.join(missing[:5])}); "
                                  "copy the whole directory save_pretrained wrote")
        files = [path / name for name in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    for file in files:
        problem = safetensors_problem(file)
        if problem is not None:
            raise ModelFilesError(f"{file}: {problem}; the weights cannot load: copy or save the model again")
    return files


def load_model(model_dir: str | Path):
    """The model of a save_pretrained directory, in eval mode, its weight files checked first."""
    from transformers import AutoModelForImageTextToText

    check_weight_files(model_dir)
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def skeleton_model(model_dir: str | Path):
    """The directory's model class built from its config on the meta device (no weights read, no
    memory): what the input checks need (classes, config, token ids) before the weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config).eval()


def load_model_dir(model_dir: str | Path):
    """(model in eval mode, processor) from a directory written by save_pretrained."""
    check_weight_files(model_dir)
    processor = load_processor(model_dir)
    return load_model(model_dir), processor
