"""Exporters stage: turn an OptimizedModel into deployable files.

The ONNX exporter (vision / embedding / decoder graphs + manifest + onnxruntime runner) lands
here as its own module; it consumes `OptimizedModel.graph_module` and adds nothing to the
capture or pass stages.
"""
