"""Deployment: merge a Kronecker model back to dense, or export it to ONNX in factored form."""

from .merge import dense_class_of, merge_to_dense
from .onnx_export import ONNX_ARCHITECTURES, check_factored_graph, export_onnx, quantize_onnx

__all__ = ["ONNX_ARCHITECTURES", "check_factored_graph", "dense_class_of", "export_onnx", "merge_to_dense",
           "quantize_onnx"]
