"""Fingerprints of a model's weights: which model a saved artifact was made from.

Hashing every weight would read the whole model; a strided sample of each parameter (evenly
spaced over the flattened tensor, the first and last elements included) tells two models of
the same class apart (random initialisations, fine-tunes, another checkpoint) at a cost
independent of the model's size. One sampler (`sampled_elements`) serves both forms:

- `weights_fingerprint`: one hex digest of the class, model type and SAMPLES values of every
  parameter as float32 (the same weights on another device or dtype give the same digest); the
  ONNX manifest records it and OnnxRunner compares it.
- `model_fingerprint`: class, config, and per parameter its shape, dtype and a sha256 of
  SAMPLED_ELEMENTS raw elements; a saved folder's manifest records it, and
  `fingerprint_differences` names what differs (config keys, parameters, weights).

Both formats are what earlier files hold: changing either one would make those files fail to
load with the very model they were made from, so each keeps its sample size and encoding.
torch is imported inside the functions: reading a saved folder's manifest stays torch-free.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn

# Values per parameter in weights_fingerprint (the ONNX manifest's weights_fingerprint).
SAMPLES = 64
# Elements per parameter in model_fingerprint's content hash (a saved folder's manifest).
SAMPLED_ELEMENTS = 1024
# Config keys that say how a model was loaded or saved, not what it computes (the parameters'
# dtypes are compared on their own).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path"}


def sampled_elements(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` evenly spaced elements of the flattened tensor, the first and the last included
    (integer indices: the same elements on any device); the whole tensor when it holds fewer."""
    import torch

    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n <= count:
        return flat
    index = torch.arange(count, device=flat.device) * ((n - 1) // (count - 1))
    index[-1] = n - 1
    return flat[index]


def weights_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model's class, decoder config sizes and a strided sample of every parameter."""
    import torch

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


def sampled_hash(tensor: torch.Tensor) -> str:
    """sha256 of SAMPLED_ELEMENTS evenly spaced elements' raw bytes (in the tensor's own dtype)."""
    import torch

    data = sampled_elements(tensor, SAMPLED_ELEMENTS).contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as {"a.b": value} without private and volatile keys, as JSON reads it back."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        key = str(key)  # e.g. id2label's int keys
        if key.startswith("_") or key in _VOLATILE_CONFIG_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value
    return json.loads(json.dumps(flat, sort_keys=True, default=str))  # tuples -> lists, as read back


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the model a plan was made on: class, config, parameter names, shapes and
    dtypes, and a content hash per parameter.

    The content hash reads a strided sample of each tensor (SAMPLED_ELEMENTS evenly spaced
    elements, about 700 KB for a 7B model) rather than the whole tensor: reading 14 GB of
    weights would cost seconds to minutes at every server start, and other weights (another
    checkpoint, a fine-tune) differ in practically every element, so a sample finds them. It
    does not guard against an edit of a few chosen weights.
    """
    parameters = {name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                         "sample_sha256": sampled_hash(p)}
                  for name, p in model.named_parameters()}
    return {"class": type(model).__name__, "config": flat_config(model.config.to_dict()),
            "parameters": parameters, "sampled_elements": SAMPLED_ELEMENTS}


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the saved model and this one (model_fingerprint's), most telling
    first (empty: the same model)."""
    if saved["class"] != current["class"]:
        return [f"model class: saved {saved['class']}, this model {current['class']}"]
    found = []
    keys = sorted(set(saved["config"]) | set(current["config"]))
    changed = [k for k in keys if saved["config"].get(k, "<absent>") != current["config"].get(k, "<absent>")]
    if changed:
        found.append("config: " + ", ".join(f"{k} saved {saved['config'].get(k, '<absent>')!r}, this model "
                                            f"{current['config'].get(k, '<absent>')!r}" for k in changed[:3])
                     + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
    old, new = saved["parameters"], current["parameters"]
    missing, extra = [n for n in old if n not in new], [n for n in new if n not in old]
    if missing:
        found.append(f"parameters missing from this model: {_listed(missing)}")
    if extra:
        found.append(f"parameters this model has and the saved one had not: {_listed(extra)}")
    shared = [n for n in old if n in new]
    reshaped = [f"{n} {old[n]['shape']}/{old[n]['dtype']} -> {new[n]['shape']}/{new[n]['dtype']}" for n in shared
                if (old[n]["shape"], old[n]["dtype"]) != (new[n]["shape"], new[n]["dtype"])]
    if reshaped:
        found.append(f"parameter shapes/dtypes: {_listed(reshaped)}")
    elif not missing and not extra:
        other = [n for n in shared if old[n]["sample_sha256"] != new[n]["sample_sha256"]]
        if other:
            found.append(f"weights: {len(other)} of {len(shared)} parameters hold other values "
                         f"(sampled content hash), e.g. {_listed(other)}")
    return found
