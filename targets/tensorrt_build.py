"""Build one TensorRT engine from a plan with the TensorRT Python API (imported only here)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from exporters.errors import BackendUnavailable, ExportError
from targets.tensorrt_plan import HARDWARE_LEVELS

log = logging.getLogger(__name__)


def _trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable("the tensorrt Python package is not installed",
                                 "pip install 'diffprism[tensorrt]' from NVIDIA's package index") from exc
    return trt


def build_engine(plan: Mapping[str, Any], onnx_path: Path, profiles: list[dict[str, dict[str, list[int]]]],
                 timing_cache: bytes) -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache) for one component; the same settings as the trtexec job.

    The plan's precision flags are empty on TensorRT 11 (strongly typed only): nothing here asks
    for a BuilderFlag that 11 removed.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan["network"]["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights resolve next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}", "check the ONNX opset and operators")

    config = builder.create_builder_config()
    b = plan["builder"]
    for flag in b["precision_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not b["tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)
    config.builder_optimization_level = b["optimization_level"]
    if b["workspace_bytes"]:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, b["workspace_bytes"])
    if b["refit"]:
        config.set_flag(trt.BuilderFlag.REFIT)
    if b["strip_weights"]:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        if not b["refit"]:
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)  # what trtexec --stripWeights does alone
    if b["version_compatible"]:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if b["hardware_compatibility"] != "none":
        member = HARDWARE_LEVELS[b["hardware_compatibility"]][0]
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    for shapes in profiles:
        if not shapes:
            continue
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # False: made on another GPU or TensorRT
        raise ExportError(f"TensorRT rejected the timing cache {plan['builder']['timing_cache']} "
                          "(it was made on another GPU or TensorRT version)",
                          "delete that file, or pass --option timing_cache=PATH for a cache of this machine")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}",
                          "run the build job script for trtexec's full log, or try a lower optimization_level")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())
