"""Precision passes on exported ONNX graphs: fp16/bf16 with fp32 islands, int8 (static QDQ, dynamic), int4."""
