"""The training script runs both kinds of phase end to end (a few steps, not a trained model):
the first from scratch, a later one from the first's output with the position probes."""

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from redlens_compile.models.demo import SHIPPED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-questions", "5",
         "--final-questions", "5", "--threads", "1"]


def train(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_proof_model.py"), *SMALL, *args],
                   check=True, capture_output=True, text=True, cwd=ROOT)


def test_two_phases_write_a_plain_llava_with_the_phases_recorded(tmp_path):
    log = tmp_path / "log.jsonl"
    train("--out", str(tmp_path / "phase1"), "--log", str(log))
    train("--init-from", str(tmp_path / "phase1"), "--out", str(tmp_path / "phase2"), "--log", str(log),
          "--curriculum-steps", "0", "--focus", "position", "--offset-probe-layer", "1", "2",
          "--offset-weight", "10", "--probe-lr", "1e-2", "--projector-coords-weight", "1", "--data-offset", "100")

    meta = json.loads((tmp_path / "phase2" / "redlens_model.json").read_text())
    assert [p["init_from"] for p in meta["phases"]] == [None, str(tmp_path / "phase1")]
    assert meta["phases"][1]["offset_probe_layer"] == [1, 2] and meta["phases"][1]["probe_lr"] == 1e-2
    assert set(meta["heldout_accuracy"]) == {"colour", "shape", "count", "position", "presence", "overall"}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in records] == [(1, 2), (2, 2)]

    # The probes and auxiliary heads are training-only: the checkpoint holds exactly the tensors
    # of the shipped model, and loads with the stock classes.
    def tensor_names(path: Path) -> set[str]:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert tensor_names(tmp_path / "phase2") == tensor_names(SHIPPED_MODEL_DIR)
    AutoModelForImageTextToText.from_pretrained(tmp_path / "phase2")
    # training pads on the right per call; the saved processor still pads on the left for generate
    assert AutoProcessor.from_pretrained(tmp_path / "phase2").tokenizer.padding_side == "left"


def test_grow_decoder_repeats_each_layer_in_place_with_residual_writes_scaled():
    import importlib.util

    import torch

    from redlens_compile.models.demo import build_llava, make_tokenizer
    from redlens_compile.models.shapes_task import vocabulary

    spec = importlib.util.spec_from_file_location("train_proof_model", ROOT / "scripts" / "train_proof_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, _ = build_llava(make_tokenizer(vocabulary()), seed=1, image_size=32)
    grown = script.grow_decoder(model, 12)
    assert grown.config.text_config.num_hidden_layers == 12 and model.config.text_config.num_hidden_layers == 4
    old = model.model.language_model.layers
    for i, layer in enumerate(grown.model.language_model.layers):
        for name, tensor in layer.state_dict().items():
            scale = 1 / 3 if name in ("self_attn.o_proj.weight", "mlp.down_proj.weight") else 1.0
            assert torch.equal(tensor, old[i // 3].state_dict()[name] * scale), (i, name)
    # everything outside the decoder layers is the source's, unchanged
    grown_state = grown.state_dict()
    for name, tensor in model.state_dict().items():
        if ".language_model.layers." not in name:
            assert torch.equal(grown_state[name], tensor), name
    # one copy per layer is the source itself: the same logits
    ids = torch.tensor([[1, 7, 9, 11, 2]])
    with torch.no_grad():
        assert torch.equal(script.grow_decoder(model, 4).eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
