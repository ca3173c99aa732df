"""Capture stage: split a transformers MLLM, export its decoder, annotate the graph."""

from .annotate import NodeAnnotation, annotate_graph, annotation
from .decoder_inputs import DecoderInputs, capture_decoder_inputs
from .decoder_module import DecoderWithHead, LogitsOnly, kv_to_cache
from .export import export_decoder
from .pipeline import CapturedDecoder, capture, check_capture
from .families import FAMILIES, FamilyAdapter, adapter_for, supported_model_classes

__all__ = [
    "CapturedDecoder",
    "capture",
    "check_capture",
    "FAMILIES",
    "DecoderInputs",
    "DecoderWithHead",
    "FamilyAdapter",
    "LogitsOnly",
    "NodeAnnotation",
    "adapter_for",
    "annotate_graph",
    "annotation",
    "capture_decoder_inputs",
    "export_decoder",
    "kv_to_cache",
    "supported_model_classes",
]
