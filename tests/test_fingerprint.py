"""fingerprint.py: both fingerprint forms keep what earlier files recorded, and the differences are named.

The digests below were written by the code before the two forms moved into one module (commit
c1af5ee: exporters' weights_fingerprint, artifact/saved.py's model_fingerprint) for a module whose
weights are a closed form: a change of either format fails here, as it would fail every ONNX
folder and saved folder written before."""

import copy
import hashlib

import torch
from torch import nn

from redlens_compile.fingerprint import (SAMPLED_ELEMENTS, fingerprint_differences, model_fingerprint,
                                         sampled_elements, weights_fingerprint)


class _Config:
    model_type = "tiny"

    def to_dict(self):
        return {"model_type": "tiny", "hidden_size": 3, "transformers_version": "x", "sub": {"layers": 2}}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.proj = nn.Linear(40, 50)
        self.norm = nn.LayerNorm(3)
        with torch.no_grad():
            self.proj.weight.copy_(torch.arange(2000, dtype=torch.float32).reshape(50, 40) / 1000)
            self.proj.bias.copy_(-torch.arange(50, dtype=torch.float32) / 7)


WRITTEN_BEFORE = {
    "weights_fingerprint": "e035b80d6c43224218a6addeaa54f5e1a075f48a0f05e5319b1f94901cf30425",
    "proj.weight": "93a2ebd80f1429da6d3166dcc2a33e8f095484e4af43fa943e15b2e9d431e1b4",
    "proj.bias": "fc03bfde2e218bc0120f72474dd9786dcaf693e84935e27ac0e1e3efd9d159ed",
    "norm.weight": "8a31a40ecac0ceb4d87b30bd156ca7a547e8e33dc071454b765fbc777d1c34a1",
    "norm.bias": "15ec7bf0b50732b49f8228e07d24365338f9e3ab994b00af08e5a3bffe55fd8b",
}


def test_both_forms_give_what_earlier_files_recorded():
    model = Tiny()
    assert weights_fingerprint(model) == WRITTEN_BEFORE["weights_fingerprint"]
    fp = model_fingerprint(model)
    assert fp["class"] == "Tiny" and fp["sampled_elements"] == SAMPLED_ELEMENTS == 1024
    assert fp["config"] == {"hidden_size": 3, "model_type": "tiny", "sub.layers": 2}  # volatile keys left out
    assert {n: p["sample_sha256"] for n, p in fp["parameters"].items()} == \
        {k: v for k, v in WRITTEN_BEFORE.items() if k != "weights_fingerprint"}


def test_the_sample_is_evenly_spaced_with_both_ends_and_hashed_as_raw_bytes():
    weight = Tiny().proj.weight
    flat = weight.detach().reshape(-1)
    step = (flat.numel() - 1) // (SAMPLED_ELEMENTS - 1)  # 1 for 2000 elements
    want = flat[[i * step for i in range(SAMPLED_ELEMENTS - 1)] + [flat.numel() - 1]]
    assert torch.equal(sampled_elements(weight, SAMPLED_ELEMENTS), want)
    assert torch.equal(sampled_elements(torch.arange(5.0), 8), torch.arange(5.0))  # fewer: the whole tensor
    assert model_fingerprint(Tiny())["parameters"]["proj.weight"]["sample_sha256"] == \
        hashlib.sha256(want.numpy().tobytes()).hexdigest()


def test_differences_name_the_weights_and_the_config():
    before = model_fingerprint(Tiny())
    assert fingerprint_differences(before, model_fingerprint(Tiny())) == []
    other = Tiny()
    with torch.no_grad():
        other.proj.weight[-1, -1] += 1.0  # the last element is always in the sample
    assert weights_fingerprint(other) != weights_fingerprint(Tiny())
    (found,) = fingerprint_differences(before, model_fingerprint(other))
    assert found.startswith("weights: 1 of 4 parameters hold other values") and "proj.weight" in found
    changed = copy.deepcopy(before)
    changed["config"]["hidden_size"] = 4
    assert fingerprint_differences(changed, before)[0] == "config: hidden_size saved 4, this model 3"
