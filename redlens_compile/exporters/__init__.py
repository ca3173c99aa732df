"""Exporters stage: an optimized decoder as ONNX files for onnxruntime, and their runner.

- onnx.py: the export (rewritten prefill, decode step, token embedding, and where they export
  the vision front and the pruning stage) with a `redlens.json` manifest, staged whole;
- onnx_lowering.py: the project's runtime ops rewritten into forms torch.onnx exports;
- decoder_step.py: the decode step as a module of plain tensors (capture/decode_step.py's
  layer-by-layer step); prune_graph.py: `prune.onnx`; vision_front.py: the decoder's inputs
  without torch (the vision graph, the merge and the position ids in numpy);
- ort_runner.py: OnnxRunner, the files run by onnxruntime with greedy KV-cached generation;
- verify.py: the files checked against the torch module (logits, greedy tokens).
"""
