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


def sampled_elements(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` evenly spaced elements of the flattened tensor, the first and the last included
    (integer indices: the same elements on any device); the whole tensor when it holds fewer."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n <= count:
        return flat
    index = torch.arange(count, device=flat.device) * ((n - 1) // (count - 1))
    index[-1] = n - 1
    return flat[index]


def weights_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model's class, decoder config sizes and a strided sample of every parameter."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    head = {"class": type(model).__name__, "model_type": getattr(config, "model_type", None)}
    digest.update(json.dumps(head, sort_keys=True).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            sample = sampled_elements(param, SAMPLES).float().contiguous()
            digest.update(f"{name}:{tuple(param.shape)}".encode())
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()
