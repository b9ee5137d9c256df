"""The trace-and-export core: diffusers pipeline components -> torch.export programs -> ONNX."""
