"""TensorRT runners: built engines (TensorRT Python API, torch CUDA tensors for memory), and the ONNX
Runtime provider settings that run the ONNX graph on ORT's TensorRT and CUDA execution providers.

An engine holds one optimization profile per planned shape range; the runner keeps one execution
context and switches it to the first profile whose range holds a feed's shapes. The context
allocates activation memory ON_PROFILE_CHANGE, so it holds one profile's worth, not the largest
profile's (as the static default would) nor one context's worth per profile.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from exporters.errors import BackendUnavailable, ExportError, ShapeError
from exporters.spec import ComponentSpec
from runtimes.base import Runner

log = logging.getLogger(__name__)

Ranges = Sequence[Mapping[str, tuple[Sequence[int], Sequence[int]]]]  # per profile: input -> (min, max)


def select_profile(ranges: Ranges, shapes: Mapping[str, Sequence[int]], what: str = "") -> int:
    """Index of the first profile whose min/max range holds every input shape."""
    for index, profile in enumerate(ranges):
        if all(_inside(shapes[name], lo, hi) for name, (lo, hi) in profile.items() if name in shapes):
            return index
    described = "; ".join(
        f"profile {i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, hi) in p.items())
        for i, p in enumerate(ranges))
    got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    raise ShapeError(f"{what}: no optimization profile holds the shapes {got} ({described})",
                     "feed shapes inside a profile, or re-plan with --option sizes=... / batch=... covering them")


def _inside(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> bool:
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def onnxruntime_tensorrt_providers(plan: Mapping[str, Any], component: str, cache_dir: Path,
                                   device_id: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """ORT providers for one component: TensorRT EP with the plan's profiles and caches, CUDA EP as fallback.

    Option names are those of ORT's TensorRT execution provider; several profiles are given by
    repeating an input in trt_profile_*_shapes, which is how that provider reads them.
    """
    b = plan["builder"]
    profiles = [p for p in plan["components"][component]["profiles"] if p]
    options: dict[str, Any] = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_builder_optimization_level": b["optimization_level"],
        "trt_fp16_enable": "FP16" in b["precision_flags"],
        "trt_bf16_enable": "BF16" in b["precision_flags"],
        "trt_int8_enable": plan["precision"] == "int8",
    }
    if b["workspace_bytes"]:
        options["trt_max_workspace_size"] = b["workspace_bytes"]
    if b["hardware_compatibility"] == "ampere_plus":
        options["trt_engine_hw_compatible"] = True
    if profiles:
        for point in ("min", "opt", "max"):
            options[f"trt_profile_{point}_shapes"] = ",".join(
                f"{name}:{'x'.join(str(v) for v in s[point])}" for shapes in profiles for name, s in shapes.items())
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {"device_id": device_id})]


# TensorRT DataType member name -> torch dtype name (looked up lazily: torch and tensorrt are optional here).
# None: TensorRT has the type, but no torch tensor holds it unpacked (INT4 and FP4 pack two values a byte,
# E8M0 is a block scale), so it cannot be an engine input or output diffprism feeds.
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
          "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn",
          "INT4": None, "FP4": None, "E8M0": None}


def torch_dtype_name(trt_dtype: str, tensor: str) -> str:
    """The torch dtype for an engine I/O tensor of TensorRT type `trt_dtype`, or a clear error."""
    if trt_dtype not in DTYPES:
        raise ExportError(f"engine tensor {tensor} has TensorRT type {trt_dtype}, which this runner does not know",
                          "keep the engine's inputs and outputs float32/float16/int (quantize inside the graph)")
    name = DTYPES[trt_dtype]
    if name is None:
        raise ExportError(f"engine tensor {tensor} is {trt_dtype}, a packed type no torch tensor holds",
                          "keep the engine's inputs and outputs float32/float16/int (quantize inside the graph)")
    return name


class TensorRtRunner(Runner):
    backend = "tensorrt"

    def __init__(self, spec: ComponentSpec, engine_path: Path, device: str = "cuda:0",
                 version_compatible: bool = False, refit_from: Path | None = None):
        super().__init__(spec)
        self.engine_path = Path(engine_path)
        self.device = device
        self.version_compatible = version_compatible
        self.refit_from = refit_from  # weight-stripped engines get their weights from the ONNX graph
        self.engine = None
        self.context: Any = None
        self.profile = -1  # the context's current optimization profile
        self.ranges: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []

    def _activate(self) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise BackendUnavailable("the tensorrt Python package is not installed",
                                     "pip install 'diffprism[tensorrt]' from NVIDIA's package index") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT engines need a CUDA GPU and none is visible",
                                     "run on a machine with an NVIDIA GPU and a CUDA build of torch")
        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.version_compatible:
            self.runtime.engine_host_code_allowed = True  # the engine embeds its lean runtime
        engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise ExportError(
                f"could not deserialize engine {self.engine_path} (built for another GPU or TensorRT version?)",
                "rebuild it on this machine with the build_engines.sh next to it",
            )
        if self.refit_from is not None:
            refitter = trt.Refitter(engine, self.logger)
            if not trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(self.refit_from)) \
                    or not refitter.refit_cuda_engine():
                raise ExportError(f"could not refit {self.engine_path} from {self.refit_from}",
                                  "rebuild the engine from the same ONNX graph")
        self.engine = engine
        self.stream = torch.cuda.Stream(device=self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: getattr(torch, torch_dtype_name(engine.get_tensor_dtype(n).name, n)) for n in names}
        self.ranges = []
        for index in range(engine.num_optimization_profiles):
            shapes = {n: engine.get_tensor_profile_shape(n, index) for n in self.inputs}
            self.ranges.append({n: (tuple(s[0]), tuple(s[2])) for n, s in shapes.items()})
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
        if self.context is None:
            raise ExportError(f"could not create an execution context for {self.engine_path}",
                              "the GPU may be out of memory; free it or run fewer models at once")
        self.profile = -1

    def use_profile(self, shapes: Mapping[str, Sequence[int]]) -> Any:
        """The context, switched to the first profile that holds `shapes` (switching only when it changes)."""
        index = select_profile(self.ranges, shapes, self.spec.name)
        if index != self.profile:
            if not self.context.set_optimization_profile_async(index, self.stream.cuda_stream):
                raise ExportError(f"could not select optimization profile {index} of {self.engine_path}")
            self.profile = index
        return self.context

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        shapes = {n: feed[n].shape for n in self.inputs}
        context = self.use_profile(shapes)
        keep = []  # device tensors must live until the stream is done
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                t = torch.from_numpy(feed[name]).to(self.device, non_blocking=False).to(self.dtypes[name]).contiguous()
                keep.append(t)
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise ShapeError(f"{self.spec.name}.{name}: TensorRT rejected shape {tuple(t.shape)}")
                context.set_tensor_address(name, t.data_ptr())
            outputs = {}
            for name in self.outputs:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
                outputs[name] = out
                context.set_tensor_address(name, out.data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise ExportError(f"TensorRT execution of {self.spec.name} failed", "run with -vv for TensorRT's log")
        self.stream.synchronize()
        del keep
        return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in outputs.items()}

    def _deactivate(self) -> None:
        self.context, self.engine, self.profile = None, None, -1

    def describe(self) -> dict[str, str]:
        info = {"backend": self.backend, "device": self.device, "engine": self.engine_path.parent.parent.name}
        try:
            import torch

            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
        except ImportError:
            pass
        return info
