"""Export a component without ever holding its weights: memory stays flat as models grow.

How it works:
1. The component is rebuilt on the meta device (accelerate.init_empty_weights) and traced there.
2. torch.onnx converts the program; before torch's optimizer runs, every parameter initializer
   gets a stand-in: its real value if it is small enough for the constant folder to compute with
   it, otherwise a zero-filled array the OS never backs with memory (an anonymous memory map,
   whose pages stay unmapped until written). Large tensors are only ever folded by the layout op Transpose, which numpy does
   as a view, so each folded weight is a view of its stand-in.
3. Each initializer of the optimized graph is then bound to the source tensor it came from (same
   name, or the stand-in its view points into, with the view's offset and strides), and written to
   model.onnx_data one tensor at a time, read straight from the source (a safetensors file or a
   state dict). Order, offsets and bytes are those of the plain export.

A graph the mapping cannot explain (a large weight folded through an op that copies) raises
StreamingUnsupported; exporters.export then falls back to the plain path with the reason logged.
"""
from __future__ import annotations

import bisect
import copy
import json
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from exporters import onnx_writer
from exporters.errors import ExportError, SourceError
from exporters.spec import ComponentSpec
from exporters.trace import trace

log = logging.getLogger(__name__)

# Tensors up to this many elements may be folded through any op by torch's optimizer (onnxscript's
# input size limit), so they get their real values; larger ones get stand-ins.
try:
    from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT as FOLD_LIMIT
except ImportError:  # pragma: no cover - older onnxscript
    FOLD_LIMIT = 8192

try:
    from onnxscript.optimizer._constant_folding import FOLDED_FROM_KEY
except ImportError:  # pragma: no cover
    FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"


class StreamingUnsupported(ExportError):
    """This component cannot be exported without its weights; the plain path is used instead."""


# --- weight sources ---------------------------------------------------------------------


class WeightSource(Protocol):
    def keys(self) -> Iterable[str]: ...

    def read(self, key: str, dtype: np.dtype) -> np.ndarray:
        """The tensor as a fresh, contiguous array of `dtype` (converted if the source differs)."""
        ...


class StateDictSource:
    """Weights of a module that is already in memory (presets)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self._tensors = dict(state_dict)

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def read(self, key: str, dtype: np.dtype) -> np.ndarray:
        t = self._tensors[key].detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; go through float32 exactly
            t = t.float()
        return np.ascontiguousarray(t.cpu().numpy().astype(dtype, copy=False))


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsSource:
    """Tensors read one at a time from safetensors files, with plain reads (no memory map).

    A memory map would count every page it touched in the process's resident memory until it is
    closed; a read into a fresh array frees the memory with the array.
    """

    def __init__(self, files: Iterable[Path]):
        self._entries: dict[str, _Entry] = {}
        for path in files:
            for key, entry in _read_header(Path(path)).items():
                self._entries[key] = entry
        if not self._entries:
            raise SourceError("no safetensors weights found", "save the model with safe_serialization=True")

    @classmethod
    def from_folder(cls, folder: Path) -> "SafetensorsSource":
        files = sorted(Path(folder).glob("*.safetensors"))
        # diffusers and transformers save fp16 variants next to the fp32 weights; prefer the default file
        default = [f for f in files if f.name.count(".") == 1]
        return cls(default or files)

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def read(self, key: str, dtype: np.dtype) -> np.ndarray:
        e = self._entries[key]
        if e.dtype == "BF16":
            import ml_dtypes

            src_dtype = np.dtype(ml_dtypes.bfloat16)
        elif e.dtype in _ST_DTYPES:
            src_dtype = np.dtype(_ST_DTYPES[e.dtype])
        else:
            raise StreamingUnsupported(f"safetensors dtype {e.dtype} of '{key}' is not supported",
                                       "export without --streaming")
        arr = np.empty(e.shape, dtype=src_dtype)
        with open(e.path, "rb") as f:
            f.seek(e.start)
            # through a uint8 view: the buffer protocol does not know ml_dtypes' bfloat16
            if f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != e.end - e.start:
                raise SourceError(f"{e.path} is truncated at tensor '{key}'", "re-download or re-save the weights")
        return arr if src_dtype == dtype else arr.astype(dtype)


def _read_header(path: Path) -> dict[str, _Entry]:
    """The safetensors header: 8-byte little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {
        key: _Entry(path, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
        for key, v in header.items() if key != "__metadata__"
    }


# --- modules without weights ----------------------------------------------------------------


def empty_copy(module: nn.Module) -> nn.Module:
    """The same architecture with parameters on the meta device (buffers stay real: they are small
    and some, like position ids, are not saved with the weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(type(module), "from_config") and not hasattr(module, "_from_config"):  # diffusers ModelMixin
            empty = type(module).from_config(module.config)
        else:  # transformers PreTrainedModel
            empty = type(module)(copy.deepcopy(module.config))
    _tie(empty)  # outside init_empty_weights, which re-registers (unties) assigned parameters
    dtypes = {p.dtype for p in module.parameters()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.float32:
        empty.to(dtype)
    return empty.eval()


def _fake_parameters(module: nn.Module):
    """Swap the meta parameters for fake CPU tensors (no storage either).

    Traced on the meta device, some ops dispatch differently than on CPU (scaled dot-product
    attention returns other strides, so a reshape becomes a copy); fake CPU tensors run the CPU
    kernels' shape functions, so the graph is the plain export's, node for node.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, nn.Parameter] = {}  # one fake per parameter: tied weights stay tied
    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_meta:
                    if id(p) not in fakes:
                        fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                        fakes[id(p)] = nn.Parameter(fake, requires_grad=False)
                    sub._parameters[name] = fakes[id(p)]
    return mode


def has_no_storage(module: nn.Module) -> bool:
    """True while every parameter is a meta or fake tensor (holds no weight bytes)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return all(p.is_meta or isinstance(p, FakeTensor) or isinstance(p.data, FakeTensor) for p in module.parameters())


def prefix_of(wrapper: nn.Module, module: nn.Module) -> str | None:
    """The state-dict prefix of `module` inside its exporter's wrapper (None if the wrapper does not hold it)."""
    for name, sub in wrapper.named_modules():
        if sub is module:
            return f"{name}." if name else ""
    return None


# --- export -----------------------------------------------------------------------------


@dataclass
class _Origin:
    key: str  # source key
    dtype: np.dtype
    stand_in: np.ndarray


class _Binder:
    """Gives initializers their stand-ins before optimization, and source readers after it."""

    def __init__(self, source: WeightSource, names: Mapping[str, str], dtypes: Mapping[str, np.dtype]):
        self.source = source
        self.names = names  # ONNX initializer name -> source key
        self.dtypes = dtypes
        self.origins: dict[int, _Origin] = {}  # stand-in's start address -> where its real values are
        self._starts: list[int] = []  # sorted keys of origins
        self.stand_in_names: set[str] = set()
        self.small = 0
        self.large = 0

    def prepare(self, model: ir.Model) -> None:
        keys = set(self.source.keys())
        for name, value in model.graph.initializers.items():
            key = self.names.get(name)
            if key is None:
                if _is_meta(value.const_value):
                    raise StreamingUnsupported(f"initializer '{name}' has no source tensor", "export without --streaming")
                continue  # a real buffer or constant traced with the module
            if key not in keys:
                raise StreamingUnsupported(f"weight '{key}' is not in the source", "export without --streaming")
            dtype = self.dtypes[name]
            shape = tuple(value.shape.numpy()) if value.shape is not None else None
            size = int(np.prod(shape)) if shape is not None else 0
            if size <= FOLD_LIMIT:
                arr = self.source.read(key, dtype)
                self.small += 1
            else:
                arr = _stand_in(shape, dtype)
                # Two written elements keep a stand-in from looking constant to rewrite rules.
                flat = arr.reshape(-1)
                flat[0] = flat[-1] = 1
                self._add_origin(_Origin(key, dtype, arr))
                self.stand_in_names.add(name)
                self.large += 1
            value.const_value = ir.Tensor(arr, name=name)

    def bind(self, model: ir.Model) -> int:
        """Point every stand-in-derived initializer at its source; returns how many were bound."""
        bound = 0
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            raw = getattr(tensor, "raw", None)
            origin = self._origin_of(raw) if isinstance(raw, np.ndarray) else None
            if origin is None:
                folded = set(value.meta.get(FOLDED_FROM_KEY, ()) or ())
                if folded & self.stand_in_names:
                    raise StreamingUnsupported(
                        f"initializer '{name}' was computed from large weights {sorted(folded & self.stand_in_names)[:2]}",
                        "export without --streaming")
                continue
            if raw.dtype != origin.dtype:
                raise StreamingUnsupported(f"initializer '{name}' reinterprets its weight's dtype",
                                           "export without --streaming")
            offset = _address(raw) - _address(origin.stand_in)
            read = _ViewRead(self.source, origin.key, origin.dtype, raw.shape, raw.strides, offset)
            value.const_value = ir.LazyTensor(read, tensor.dtype, tensor.shape, name=tensor.name)
            bound += 1
        self.origins.clear()  # drop the stand-ins
        self._starts.clear()
        return bound

    def _add_origin(self, origin: _Origin) -> None:
        start = _address(origin.stand_in)
        self.origins[start] = origin
        bisect.insort(self._starts, start)

    def _origin_of(self, array: np.ndarray) -> _Origin | None:
        """The stand-in whose memory `array` views (the optimizer folds large weights only through
        views), found by address: a view's .base does not lead back to a memory-mapped array."""
        address = _address(array)
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        origin = self.origins[self._starts[i]]
        return origin if address < self._starts[i] + origin.stand_in.nbytes else None


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _stand_in(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array in its own anonymous memory map: the kernel backs a page only once it is
    written, so a stand-in costs no memory. (np.zeros may take recycled heap memory and clear it,
    which touches every page: about 0.8 GB for an SD 1.5 UNet.)"""
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


@dataclass(frozen=True)
class _ViewRead:
    """Reads a source tensor and applies the view (layout) the optimizer applied to its stand-in."""

    source: WeightSource
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    def __call__(self) -> ir.Tensor:
        real = self.source.read(self.key, self.dtype)
        view = np.ndarray(self.shape, self.dtype, buffer=real, offset=self.offset, strides=self.strides)
        return ir.Tensor(np.ascontiguousarray(view))


def _is_meta(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and (raw.is_meta or type(raw).__name__ == "FakeTensor")


def export_streamed(wrapper: nn.Module, module: nn.Module, spec: ComponentSpec, source: WeightSource,
                    directory: Path, opset: int, edit: Callable[[ir.Model], object] | None = None) -> Path:
    """Trace `wrapper` (holding the meta-device `module`) and write directory/model.onnx(+_data).

    Weights come from `source`, keyed like `module.state_dict()`; nothing holds more than one
    weight tensor at a time. `edit(model)` runs on the bound graph before it is saved (weights are
    still lazy there: exporters.weights_dtype converts each one as it is written).
    """
    if not has_no_storage(module):
        raise StreamingUnsupported("the module holds real weights", "pass a meta-device copy (empty_copy)")
    prefix = prefix_of(wrapper, module)
    if prefix is None:
        raise StreamingUnsupported("the component wrapper does not hold the module", "export without --streaming")
    params = dict(wrapper.named_parameters(remove_duplicate=False))
    # A tied weight has several names (T5's shared / encoder.embed_tokens) and is saved under one of them.
    saved = _saved_names(params, source, prefix)
    names = {name: saved[name[len(prefix):]] for name in params if name.startswith(prefix)}
    dtypes = {name: np.dtype(torch.empty((), dtype=p.dtype).numpy().dtype) if p.dtype != torch.bfloat16
              else np.dtype(np.float32) for name, p in params.items()}
    if any(p.dtype == torch.bfloat16 for p in params.values()):
        raise StreamingUnsupported("bfloat16 modules are not streamed", "export without --streaming")
    fake_mode = _fake_parameters(module)
    log.info("%s: tracing on the meta device", spec.name)  # stage lines: benchmarks profile memory by them
    try:
        program = trace(wrapper, spec, fake_mode=fake_mode)
    except ExportError as exc:
        raise StreamingUnsupported(f"tracing '{spec.name}' on the meta device failed: {exc.message}",
                                   "export without --streaming") from exc
    binder = _Binder(source, names, dtypes)
    log.info("%s: converting to ONNX", spec.name)
    model = onnx_writer.to_onnx(program, spec, opset, prepare=binder.prepare)
    bound = binder.bind(model)
    del program
    log.info("%s: %d weights streamed (%d large via stand-ins, %d small read up front), %d initializers bound",
             spec.name, binder.small + binder.large, binder.large, binder.small, bound)
    if edit is not None:
        edit(model)
    log.info("%s: writing the graph and streaming its weights", spec.name)
    return onnx_writer.save(model, directory)


# --- references with streamed weights --------------------------------------------------------


class _TorchWeights(Mapping):
    """accelerate's weights_map: source tensors by state-dict key, read on each access."""

    def __init__(self, source: WeightSource, dtypes: Mapping[str, torch.dtype], saved_as: Mapping[str, str]):
        self._source = source
        self._dtypes = dtypes
        self._saved_as = saved_as  # a tied weight's names -> the one the source holds

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype = self._dtypes[key]
        return torch.from_numpy(self._source.read(self._saved_as.get(key, key),
                                                  np.dtype(torch.empty((), dtype=dtype).numpy().dtype)))

    def __iter__(self):
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)


def _saved_names(params: Mapping[str, nn.Parameter], source: WeightSource, prefix: str = "") -> dict[str, str]:
    """Parameter name (without prefix) -> the source key holding it: a tied weight is saved under one of its names."""
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        if name.startswith(prefix):
            aliases.setdefault(id(p), []).append(name[len(prefix):])
    keys = set(source.keys())
    return {name[len(prefix):]: next((k for k in aliases[id(p)] if k in keys), name[len(prefix):])
            for name, p in params.items() if name.startswith(prefix)}


def stream_weights_in_forward(module: nn.Module, source: WeightSource) -> None:
    """Make a meta-device module runnable: each submodule reads its weights from `source` just
    before its forward and drops them after (accelerate's offload hooks), so a PyTorch reference
    run holds one layer's weights at a time."""
    from accelerate.hooks import attach_align_device_hook

    params = dict(module.named_parameters(remove_duplicate=False))
    dtypes = {name: p.dtype for name, p in params.items()}
    attach_align_device_hook(module, execution_device=torch.device("cpu"), offload=True,
                             weights_map=_TorchWeights(source, dtypes, _saved_names(params, source)))


# --- rewriting weights of a written model, one tensor at a time --------------------------------


def map_weights(src_dir: Path, dst_dir: Path, fn: Callable[[str, np.ndarray], np.ndarray | None],
                *, check: bool = True) -> Path:
    """Copy src_dir/model.onnx(+_data) to dst_dir with each initializer passed through `fn`.

    `fn(name, array)` returns the new array (any dtype; the graph's declared type follows it) or
    None to keep the tensor. Tensors are read, converted and written one at a time, so a pass such
    as fp16 conversion never holds the whole model. Graph edits (Cast nodes etc.) are the caller's:
    pass `edit(model)` work before calling this, or use the returned file.
    """
    model = ir.load(str(Path(src_dir) / onnx_writer.ONNX_NAME))
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        probe_dtype = _new_dtype(fn, name, tensor)
        if probe_dtype is None:
            continue
        value.const_value = ir.LazyTensor(_Mapped(tensor, name, fn), ir.DataType.from_numpy(probe_dtype),
                                          tensor.shape, name=tensor.name)
        value.dtype = ir.DataType.from_numpy(probe_dtype)
    path = onnx_writer.save(model, Path(dst_dir)) if check else _save_unchecked(model, Path(dst_dir))
    return path


def _save_unchecked(model: ir.Model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / onnx_writer.ONNX_NAME
    ir.save(model, path, external_data=onnx_writer.DATA_NAME, size_threshold_bytes=1024)
    return path


def _new_dtype(fn, name: str, tensor) -> np.dtype | None:
    """The dtype fn produces for this tensor, found on a zero-size array so nothing is read."""
    empty = np.empty((0,), dtype=tensor.dtype.numpy())
    out = fn(name, empty)
    return None if out is None else out.dtype


@dataclass(frozen=True)
class _Mapped:
    tensor: object
    name: str
    fn: Callable[[str, np.ndarray], np.ndarray | None]

    def __call__(self) -> ir.Tensor:
        arr = self.tensor.numpy()
        out = self.fn(self.name, arr)
        if np.shares_memory(out, arr):
            out = out.copy()
        del arr  # the external tensor's memory map closes only once nothing points into it
        if hasattr(self.tensor, "release"):  # unmap the source pages of an external tensor
            self.tensor.release()
        return ir.Tensor(np.ascontiguousarray(out))


def to_float16(name: str, array: np.ndarray) -> np.ndarray | None:
    """fn for map_weights: float32 weights to float16, everything else unchanged."""
    return array.astype(np.float16) if array.dtype == np.float32 else None


def source_for(module: nn.Module, folder: Path | None) -> WeightSource:
    """Where a component's weights come from: its safetensors folder if known, else its state dict."""
    if folder is not None:
        return SafetensorsSource.from_folder(folder)
    if has_no_storage(module):
        raise StreamingUnsupported("a meta-device module needs a weights folder", "export from a saved folder")
    return StateDictSource(module.state_dict())


__all__ = [
    "FOLD_LIMIT", "SafetensorsSource", "StateDictSource", "StreamingUnsupported", "WeightSource",
    "empty_copy", "export_streamed", "has_no_storage", "map_weights", "source_for", "stream_weights_in_forward",
    "to_float16",
]



# --- pipelines without weights ------------------------------------------------------------------

def empty_pipeline(folder: Path):
    """A saved diffusers pipeline with its models built on the meta device (configs only).

    Scheduler and tokenizers load as usual; each model's weights stay in folder/<part>/ and are
    streamed from there by export_streamed and stream_weights_in_forward.
    """
    import importlib

    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    parts = {}
    for part, entry in index.items():
        if part.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue  # scheduler, tokenizers, feature extractors load as usual
        with init_empty_weights(include_buffers=False):
            if library == "diffusers":
                parts[part] = cls.from_config(cls.load_config(Path(folder) / part))
            else:
                parts[part] = cls(cls.config_class.from_pretrained(Path(folder) / part))
        _tie(parts[part])
        parts[part].eval()
        parts[part]._diffprism_weights = Path(folder) / part  # where export_streamed reads from
    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **parts)


def _tie(model: nn.Module) -> None:
    """Tie shared weights as from_pretrained does (T5's embed_tokens is `shared`, saved once)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def weights_folder(module: nn.Module) -> Path | None:
    return getattr(module, "_diffprism_weights", None)
