"""Device-agnostic by construction, checked without an accelerator: no tensor factory call in the
package's own code without `device=` (it would land on the CPU beside a GPU model's tensors), no
float64 in what runs per forward, and every `.numpy()` on a `.cpu()` result (tests/device_guard.py).

The ONNX export and the codebook build run under the same guard in their own tests
(tests/exporters/test_onnx.py, tests/analysis/test_codebook.py), where they already run.
"""

import pytest
import torch
from device_guard import factories_without_device, numpy_without_cpu
from tiny_families import make_inputs

import redlens_compile as rc
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.capture.decoder_inputs import capture_decoder_inputs
from redlens_compile.capture.families import adapter_for

NEW_TOKENS = 3


def _codebook(model, example, path):
    inputs = capture_decoder_inputs(model, adapter_for(model), example)
    rows = inputs.inputs_embeds[0][inputs.visual_mask[0]]
    return str(Codebook(rows[::7].clone(), {"model_type": model.config.model_type}).save(path))


CONFIGS = {
    # ranking, the budget planner, dynamic FFN, hollow attention, random pruning with the key bias
    "budget-0.5+random-0.25": dict(flops_budget=0.5, prune="random", prune_keep=0.25),
    "codebook-0.25": dict(flops_budget=1.0, prune="codebook", prune_keep=0.25),
    "fastv-0.25": dict(flops_budget=1.0, prune="fastv", prune_keep=0.25, prune_layer=1),  # two graphs, layered decode
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_optimize_forward_and_generate_create_tensors_beside_their_inputs(family_models, tmp_path, config):
    model = family_models("llava")
    example = make_inputs("llava", model)
    batch = make_inputs("llava", model, text_before=6, batch=2, pad_left=(2,), seed=4)
    settings = dict(CONFIGS[config])
    if settings["prune"] == "codebook":
        settings["codebook"] = _codebook(model, example, tmp_path / "cb.safetensors")
    with factories_without_device() as analysis_sites:
        opt = rc.optimize(model, example, config=rc.RedLensConfig(**settings))  # capture, FLOPs, ranking, passes
    assert analysis_sites == [], "\n".join(sorted(set(analysis_sites)))
    with factories_without_device(runtime=True) as runtime_sites:
        out = opt(**batch)
        ids = opt.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[], do_sample=False)
    assert runtime_sites == [], "\n".join(sorted(set(runtime_sites)))
    assert torch.isfinite(out.logits[batch["attention_mask"][:, -out.logits.shape[1]:].bool()]).all()
    assert ids.shape[1] == batch["input_ids"].shape[1] + NEW_TOKENS


def test_the_guard_sees_a_factory_without_device_and_float64():
    """The guard itself: a call from the package's code is recorded, one from elsewhere is not."""
    from redlens_compile.ops import rows

    mask = torch.tensor([[True, False, True]])
    with factories_without_device(runtime=True) as sites:
        rows.visual_layout(mask)  # every factory call there has its device
        torch.arange(3)  # this file is not the package
    assert sites == []
    source = "import torch\ndef f(x):\n    return torch.arange(x.shape[0]), x.double()\n"
    namespace = {}
    exec(compile(source, str(rows.__file__), "exec"), namespace)  # as if it were the package's code
    with factories_without_device(runtime=True) as sites:
        namespace["f"](mask)
    assert [s.split(" ", 1)[1] for s in sites] == ["torch.arange without device=", "float64 (double)"]


def test_every_numpy_call_reads_a_host_tensor():
    sites = numpy_without_cpu()
    assert sites == [], "\n".join(sites)
