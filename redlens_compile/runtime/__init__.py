"""Runtime stage: what runs at inference time around the compiled graphs, shared by the
artifact (OptimizedModel) and the exporters: the token pruning stage on the decoder's inputs
(before the first layer or between two layers) and its builder from the config.

Below passes in the layering (pyproject.toml's import-linter contract): passes/compile.py names
the stage's type in the CompiledDecoder it returns.
"""

from .token_pruning import AFTER_LAYER, BEFORE_FIRST_LAYER, PrunedInputs, TokenPruning, build_pruning

__all__ = ["AFTER_LAYER", "BEFORE_FIRST_LAYER", "PrunedInputs", "TokenPruning", "build_pruning"]
