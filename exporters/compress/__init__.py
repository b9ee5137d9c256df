"""Torch-side compression before export: pruning (unstructured and structured), QAT, distillation.

Each method turns one pipeline component into a smaller or fake-quantized *student*,
recovers accuracy by distilling it against the unchanged *teacher* on captured (or
reference) inputs, and exports it through the same spine as the fp32 tree
(exporters.export.export_component). Two entry points: `compress_export`
(exporters.compress.transform) writes a new export folder that every target compiles
(`diffprism compress`); `compress_component` is what the ONNX Runtime target calls for its
`pruned` and `qat` precisions.
"""
from exporters.compress.build import METHODS, CompressOptions, compress_component

__all__ = ["METHODS", "CompressOptions", "compress_component"]
