"""A cheap fingerprint of a model's weights: which model a saved artifact was made from.

Hashing every weight would read the whole model; a strided sample of each parameter (at most
SAMPLES values, evenly spaced over the flattened tensor) with its name and shape tells two
models of the same class apart (random initialisations, fine-tunes, another checkpoint) at a
cost independent of the model's size. Values are hashed as float32 on the CPU, so the same
weights on another device give the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

SAMPLES = 64


def weights_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model's class, decoder config sizes and a strided sample of every parameter."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    head = {"class": type(model).__name__, "model_type": getattr(config, "model_type", None)}
    digest.update(json.dumps(head, sort_keys=True).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLES)
            sample = flat[::stride][:SAMPLES].float().contiguous()
            digest.update(f"{name}:{tuple(param.shape)}".encode())
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()
