"""The redundancy codebook on disk: one safetensors file, prototypes plus JSON metadata.

The metadata rides in the safetensors header (string to string), under one key holding JSON:
model type, hidden size, the thresholds and clustering settings of the build, and how many
images and candidates it counted. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CodebookError
from ..files import check_output_file, save_safetensors

FORMAT = "redlens-codebook/1"
METADATA_KEY = "redlens_codebook"
PROTOTYPES_KEY = "prototypes"


@dataclass
class Codebook:
    """Redundant prototypes [P, D] in the projector's output space, and how they were found."""

    prototypes: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def model_type(self) -> str | None:
        return self.metadata.get("model_type")

    def check_compatible(self, model_type: str, hidden_size: int, path: str = "the codebook") -> None:
        """A codebook is only meaningful in the embedding space of the model it was built on."""
        if self.hidden_size != hidden_size:
            raise CodebookError(
                f"{path} holds prototypes of dim {self.hidden_size}, but this model's decoder hidden size is "
                f"{hidden_size}: build a codebook for this model with `redlens-compile codebook MODEL_DIR --images DIR`"
            )
        if self.model_type is not None and self.model_type != model_type:
            raise CodebookError(
                f"{path} was built on a {self.model_type!r} model, this model is {model_type!r}: build a codebook "
                "for this model with `redlens-compile codebook MODEL_DIR --images DIR`"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write to `path` (which must not exist) through a temporary file: never a half file."""
        path = Path(path)
        check_output_file(path, error=CodebookError)
        metadata = dict(self.metadata, format=FORMAT, prototypes=int(self.prototypes.shape[0]))
        return save_safetensors(path, {PROTOTYPES_KEY: self.prototypes}, METADATA_KEY, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Codebook":
        path = Path(path)
        if not path.is_file():
            raise CodebookError(f"codebook {path}: no such file (build one with `redlens-compile codebook`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if PROTOTYPES_KEY not in f.keys():
                    raise CodebookError(f"codebook {path}: no '{PROTOTYPES_KEY}' tensor; not a redlens codebook")
                prototypes = f.get_tensor(PROTOTYPES_KEY)
        except CodebookError:
            raise
        except Exception as exc:
            raise CodebookError(f"codebook {path} is not a readable safetensors file: {exc}") from exc
        try:
            metadata = json.loads(header[METADATA_KEY])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CodebookError(f"codebook {path}: no redlens metadata in its header; not a redlens codebook") from exc
        if metadata.get("format") != FORMAT:
            raise CodebookError(f"codebook {path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
        if prototypes.dim() != 2 or prototypes.shape[0] == 0:
            raise CodebookError(f"codebook {path}: prototypes of shape {tuple(prototypes.shape)}; expected [P >= 1, D]")
        return cls(prototypes=prototypes, metadata=metadata)
