"""The bundled models: the trained proof model (`proof_llava/`) and its codebook, the demo
model builder (demo.py), the proof task (shapes_task.py) and its accuracy check (evaluate.py).

The paths below import nothing heavy: the presets (redlens_compile/presets.py) and the CLI's
early checks read them before torch loads.
"""

from pathlib import Path

# The trained proof model ships here (weights, tokenizer, processor); see scripts/train_proof_model.py.
PROOF_MODEL_DIR = Path(__file__).resolve().parent / "proof_llava"
# The codebook shipped beside it (the codebook pruning presets' default); see scripts/build_proof_codebook.py.
PROOF_CODEBOOK = PROOF_MODEL_DIR / "codebook.safetensors"
