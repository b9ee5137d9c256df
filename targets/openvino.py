"""OpenVINO target: each ONNX component -> OpenVINO IR, in a tree optimum-intel's OVDiffusionPipeline loads.

<out>/openvino-<precision>/ holds model_index.json, scheduler/, tokenizer*/ (copied from the
ONNX tree) and <component>/{openvino_model.xml, openvino_model.bin, config.json}.

Every precision starts from the converted graph with each group norm fused into one
GroupNormalization op (targets/openvino_fusion.py), as OpenVINO's PyTorch frontend would emit it.

Precisions:
- fp32: converted as is.
- fp16: weights stored as f16 (OpenVINO decompresses them at load; compute precision is the
  runtime's inference precision hint, see runtimes/openvino_runner.py); the frequency tables of
  sinusoidal phases stay f32 (`fp16_weights`).
Runtime configuration (`runtime_options`): fp32 runs at the f32 hint, every other precision at the
device's default inference precision, as deployed; validation adds an f32-hint weights-only check.
- int8: components in `quantize_activations` (default: the denoiser, UNet or transformer, which runs every step) get
  NNCF post-training quantization calibrated on the captured UNet inputs (`diffprism calibrate`);
  the scheme is optimum-intel's hybrid one by default (activations and weights of convolutions
  and of activation-activation matmuls quantized, linear layers weight-only int8) or `full`
  (linear layers' activations quantized too). Other components get weight-only int8.
- int4: NNCF weight-only int4 of matmul/embedding weights, grouped; a layer whose input width
  does not divide by the group gets the largest power-of-two group that does (>= 16), and
  layers that fit no group (and convolutions, which NNCF keeps in backup mode) get int8.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from exporters.calibration import CALIBRATION_DIR
from exporters.errors import ExportError, UsageError
from exporters.files import staged_dir
from exporters.onnx_writer import ONNX_NAME
from exporters.spec import ComponentSpec, Dim
from exporters import memory
from exporters.tree import TREE_INFO, read_geometry, read_tree_info, write_tree_info
from targets.base import Availability, BuildResult, Inputs, Target, TargetConfig
from targets.openvino_fusion import fuse_group_norms

log = logging.getLogger(__name__)

XML_NAME = "openvino_model.xml"
BIN_NAME = "openvino_model.bin"
EXTRA = "pip install 'diffprism[openvino]'"
DENOISER = "denoiser"


class OpenVinoConfig(TargetConfig):
    # Fixed input size in pixels, "HEIGHTxWIDTH" (OpenVINO runs static shapes faster); None keeps the
    # spec's bounded dynamic ranges. `batch` fixes the batch the same way, in images.
    static: str | None = None
    batch: int | None = Field(default=None, ge=1)
    # int8: components quantized with activations (calibrated); the rest are weight-only int8.
    # "denoiser" names the export's denoiser (the UNet, or SD3's / Flux's transformer).
    quantize_activations: list[str] = Field(default_factory=lambda: [DENOISER])
    # hybrid: on trained tiny-shapes full int8 loses 11 points of prompt match and 6.6 dB (docs/benchmarks.md)
    int8_scheme: Literal["hybrid", "full"] = "hybrid"
    calibration_samples: int = Field(default=300, ge=1)  # at most this many captured calls per component
    # int4: NNCF weight compression parameters.
    int4_mode: Literal["int4_asym", "int4_sym"] = "int4_asym"
    int4_group_size: int = Field(default=64, ge=-1)
    int4_ratio: float = Field(default=1.0, gt=0, le=1)


class OpenVinoTarget(Target):
    name = "openvino"
    precisions = ("fp32", "fp16", "int8", "int4")
    Config = OpenVinoConfig
    tools = ("openvino", "nncf")

    def inputs(self, config: TargetConfig) -> Inputs:
        assert isinstance(config, OpenVinoConfig)
        calibrated = config.precision == "int8" and bool(config.quantize_activations)
        return Inputs(calibration="required" if calibrated else "none")

    def availability(self) -> Availability:
        missing = []
        for module in ("openvino", "nncf"):
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed", EXTRA)
        return Availability(True)

    # -- plan (pure) ---------------------------------------------------------------------
    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        assert isinstance(config, OpenVinoConfig)
        geometry = read_geometry(tree)
        activations = {geometry.denoiser if c == DENOISER else c for c in config.quantize_activations}
        unknown = sorted(activations - set(specs)) if config.precision == "int8" else []
        if unknown and config.components is None:
            raise UsageError(f"quantize_activations names {unknown}, not in this export", f"exported: {list(specs)}")
        size = _parse_static(config.static) if config.static else None
        factor = geometry.vae_scale_factor
        components = {}
        for name, spec in specs.items():  # `batch` counts images: the denoiser's is 2x under guidance
            batch = config.batch * geometry.batch_factor(name) if config.batch else None
            built = _fixed_spec(spec, size, factor, batch)
            components[name] = {
                "onnx": str(tree / name / ONNX_NAME),
                "spec": built.to_json(),
                "shapes": _partial_shapes(built),
                "compression": _compression(config, name, activations),
            }
        out_name = self.output_dir(Path("."), config).name
        return {
            "target": self.name,
            "precision": config.precision,
            "tree": str(tree),
            "out_name": out_name,
            "static": config.static,
            "batch": config.batch,
            "components": components,
            "calibration_samples": config.calibration_samples,
            "int8_scheme": config.int8_scheme,
            "int4": {"mode": config.int4_mode, "group_size": config.int4_group_size, "ratio": config.int4_ratio},
        }

    # -- build ---------------------------------------------------------------------------
    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        self.availability().require("OpenVINO target")
        import openvino as ov

        needs_data = [n for n, c in plan["components"].items() if c["compression"] == "int8_activations"]
        calibration = out / CALIBRATION_DIR
        if needs_data and not (calibration / "info.json").is_file():
            raise UsageError(
                f"int8 quantizes the activations of {needs_data} and needs a calibration capture ({calibration} is missing)",
                f"run 'diffprism calibrate {out}' first, or pass --option quantize_activations=[] for weight-only int8",
            )
        tree = Path(plan["tree"])
        info, _ = read_tree_info(tree)
        final = out / plan["out_name"]
        result = BuildResult(self.name, plan["precision"], final)
        with staged_dir(final) as tmp:
            _copy_pipeline_files(tree, tmp)
            specs = {}
            for name, comp in plan["components"].items():
                start = time.perf_counter()
                spec = ComponentSpec.from_json(comp["spec"])
                specs[name] = spec
                step = "openvino int8 weights" if comp["compression"].startswith("int") else "openvino compile"
                memory.check(step, _onnx_bytes(tree / name), fix=f"set {memory.ENV} if the estimate is too cautious, "
                             f"or compile '{name}' on a machine with more memory (--components)")
                model = ov.convert_model(comp["onnx"])
                model.reshape({k: ov.PartialShape(v) for k, v in comp["shapes"].items()})
                group_norms = fuse_group_norms(model)  # before NNCF, so it sees the ops the runtime runs
                model = _compress(model, comp["compression"], name, plan, calibration)
                directory = tmp / name
                directory.mkdir()
                # A half tree (export --dtype) already stores compressed weights; OpenVINO's fp16 compression
                # of bf16 Constant->Convert chains breaks them (10% error on tiny-flux), so they stay as stored.
                half_tree = info.get("weights_dtype", "fp32") != "fp32"
                if comp["compression"] == "fp16" and not half_tree:
                    model = fp16_weights(model)
                ov.save_model(model, str(directory / XML_NAME), compress_to_fp16=False)
                shutil.copy2(tree / name / "config.json", directory / "config.json")
                del model
                summary = ir_summary(ov.Core().read_model(str(directory / XML_NAME)))  # what the file holds
                size = (directory / XML_NAME).stat().st_size + (directory / BIN_NAME).stat().st_size
                result.details[name] = {
                    "compression": comp["compression"],
                    "group_norms_fused": group_norms,
                    "bytes": size,
                    "onnx_bytes": _onnx_bytes(tree / name),
                    "seconds": round(time.perf_counter() - start, 2),
                    "fake_quantize": summary["ops"].get("FakeQuantize", 0),
                    "weight_types": summary["weights"],
                }
                log.info("openvino %s %s: %s", plan["precision"], name, result.details[name])
            write_tree_info(tmp, {**info, "precision": plan["precision"], "target": self.name,
                                  "static": plan["static"], "batch": plan["batch"]}, specs)
        result.files = sorted(p for p in final.rglob("*") if p.is_file())
        return result

    # -- runtime configuration -----------------------------------------------------------
    def runtime_options(self, config: TargetConfig) -> dict[str, Any]:
        # fp32 is deployed to match PyTorch fp32; the smaller variants are deployed for speed, at the
        # device's own inference precision (bf16 on CPUs with AVX512-BF16/AMX, f16 on GPUs).
        return {"hint": "f32" if config.precision == "fp32" else "default"}

    def weights_only_options(self, config: TargetConfig) -> dict[str, Any] | None:
        return {"hint": "f32"}  # skipped where the deploy configuration already is f32 (fp32 by default)

    # -- runner --------------------------------------------------------------------------
    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        from runtimes.openvino_runner import OpenVinoRunner

        xml = artifact_dir / spec.name / XML_NAME
        if not xml.is_file():
            raise ExportError(f"no OpenVINO IR for '{spec.name}' at {xml}", f"re-run 'diffprism compile --target {self.name}'")
        # A static build accepts only its fixed dims: the runner checks feeds against the built spec.
        if (artifact_dir / TREE_INFO).is_file():
            spec = read_tree_info(artifact_dir)[1].get(spec.name, spec)
        return OpenVinoRunner(spec, xml, **options)


# --- helpers ------------------------------------------------------------------------------


def _compression(config: OpenVinoConfig, component: str, activations: set[str]) -> str:
    if config.precision == "int8":
        return "int8_activations" if component in activations else "int8_weights"
    if config.precision == "int4":
        return "int4_weights"
    return config.precision  # fp32 / fp16


def _parse_static(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise UsageError(f"static size {text!r} is not HEIGHTxWIDTH", "write e.g. --option static=512x512")
    return int(m.group(1)), int(m.group(2))


def _fixed_spec(spec: ComponentSpec, size: tuple[int, int] | None, factor: int, batch: int | None) -> ComponentSpec:
    """The spec with height/width (and the sequence) fixed for a static size, and batch fixed if asked."""
    ranges: dict[str, tuple[int, int, int]] = {}
    names = {d.name for d in spec.dims}
    if size is not None:
        for dim, px in zip(("height", "width"), size):
            if dim in names:
                if px % factor:
                    raise UsageError(f"static {dim} {px} px is not a multiple of the VAE scale {factor}",
                                     f"use a multiple of {factor}")
                ranges[dim] = (px // factor,) * 3
        if "sequence" in names:
            ranges["sequence"] = (spec.dim("sequence").opt,) * 3
    if batch is not None and "batch" in names:
        ranges["batch"] = (batch,) * 3
    return spec.restrict(**ranges) if ranges else spec


def _partial_shapes(spec: ComponentSpec) -> dict[str, list]:
    """Per input: ints for static axes, [min, max] for bounded dynamic ones (OpenVINO's Dimension range)."""
    dims: dict[str, Dim] = {d.name: d for d in spec.dims}
    shapes = {}
    for t in spec.inputs:
        shape: list = []
        for a in t.axes:
            if isinstance(a, int):
                shape.append(a)
            else:
                d = dims[a.dim]
                shape.append(a.size(d.min) if d.is_static else [a.size(d.min), a.size(d.max)])
        shapes[t.name] = shape
    return shapes


def _copy_pipeline_files(tree: Path, dst: Path) -> None:
    """model_index.json, scheduler/ and tokenizer*/: what optimum-intel reads besides the IRs."""
    shutil.copy2(tree / "model_index.json", dst / "model_index.json")
    for sub in tree.iterdir():
        if sub.is_dir() and (sub.name == "scheduler" or sub.name.startswith("tokenizer")):
            shutil.copytree(sub, dst / sub.name)


def _onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx"))


# Ops a position or phase computation is made of (as exporters.precision.half.index_arithmetic's).
_PHASE_OPS = {"Convert", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Multiply", "Add", "Subtract", "Divide", "Power",
              "Exp", "Log", "Sin", "Cos", "Broadcast", "Range", "ShapeOf", "StridedSlice", "Slice", "Transpose", "Tile",
              "Negative", "Sqrt", "Floor", "Ceiling", "Minimum", "Maximum", "Select", "Abs"}
_MIN_FP16_ELEMENTS = 16  # scalars and shape constants stay f32


def fp16_weights(model):
    """The model with its f32 weights stored as f16 (a Convert back to f32 after each), except the
    constants of sinusoidal phases.

    `save_model(compress_to_fp16=True)` also compresses the frequency tables of timestep and
    rotary embeddings: a timestep x 1000 times a frequency rounded to f16 is off by radians,
    and a tiny Flux transformer's output by 1 % (past the fp16 bounds) although every weight is
    fine in f16. The Python API cannot mark a constant as precise, so the compression happens here.
    """
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    keep = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Sin", "Cos"):
            continue
        chain, stack, ok = [], [op], True
        while stack and ok:
            node = stack.pop()
            kind = node.get_type_name()
            if kind in ("Constant", "Parameter"):
                chain.append(node)
            elif kind in _PHASE_OPS:
                stack.extend(i.get_source_output().get_node() for i in node.inputs())
            else:  # a layer: the phase is computed from activations, not positions
                ok = False
        if ok:
            keep.update(n.get_friendly_name() for n in chain)
    replaced = 0
    for op in model.get_ordered_ops():
        if (op.get_type_name() != "Constant" or op.get_friendly_name() in keep
                or op.get_output_element_type(0) != ov.Type.f32 or op.get_output_partial_shape(0).is_dynamic):
            continue
        data = op.get_data()
        if data.size < _MIN_FP16_ELEMENTS:
            continue
        half = ops.constant(data.astype(np.float16), name=f"{op.get_friendly_name()}_compressed")
        back = ops.convert(half, ov.Type.f32)
        back.set_friendly_name(op.get_friendly_name())
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
        replaced += 1
    log.debug("fp16: %d constant(s) stored as f16, %d phase constant(s) kept f32", replaced, len(keep))
    model.validate_nodes_and_infer_types()
    return model


def _compress(model, compression: str, name: str, plan: dict[str, Any], calibration: Path):
    if compression in ("fp32", "fp16"):
        return model
    with _nncf_output_to_stderr():
        return _compress_nncf(model, compression, name, plan, calibration)


@contextlib.contextmanager
def _nncf_output_to_stderr():
    """NNCF logs and draws progress bars on stdout, which belongs to the CLI's --json document."""
    import nncf  # noqa: F401  (sets up its logger)

    handlers = [(h, h.stream) for h in logging.getLogger("nncf").handlers if isinstance(h, logging.StreamHandler)]
    for h, _ in handlers:
        h.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h, stream in handlers:
            h.setStream(stream)


def _compress_nncf(model, compression: str, name: str, plan: dict[str, Any], calibration: Path):
    import nncf

    if compression == "int8_weights":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if compression == "int4_weights":
        p = plan["int4"]
        return nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode(p["mode"]),
            group_size=p["group_size"],
            ratio=p["ratio"],
            backup_mode=nncf.BackupMode.INT8_ASYM,
            # Tiny models (and some full-size layers) have input widths the group does not divide:
            # use a smaller power-of-two group there instead of failing; below 16, int8.
            advanced_parameters=nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16),
        )
    if compression == "int8_activations":
        return _quantize(model, name, plan, calibration)
    raise ExportError(f"unknown compression '{compression}' for {name}")


def _quantize(model, name: str, plan: dict[str, Any], calibration: Path):
    """Post-training int8 quantization of weights and activations, calibrated on captured inputs."""
    import nncf

    from exporters.calibration import load_feeds

    feeds = load_feeds(calibration, name)
    spec = ComponentSpec.from_json(plan["components"][name]["spec"])
    usable = []
    for feed in feeds:  # a static build only accepts captures at its own size
        try:
            spec.check_feed(feed)
            usable.append(feed)
        except Exception:
            continue
    if not usable:
        raise UsageError(f"no calibration sample of '{name}' fits the build's shapes ({plan['static']}, batch {plan['batch']})",
                         "re-run 'diffprism calibrate' at the static size, or drop the static option")
    subset = min(len(usable), plan["calibration_samples"])
    dataset = nncf.Dataset(usable)
    ignored = None
    if plan["int8_scheme"] == "hybrid":
        # optimum-intel's hybrid scheme: linear layers (matmuls with constant weights) and embeddings
        # get weight-only int8 first; the quantizer then leaves them alone and quantizes the rest.
        names = _weighted_matmuls(model)
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      # not strict: a DiT transformer has no convolution to leave out
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False))
        ignored = nncf.IgnoredScope(names=names, validate=False) if names else None
    return nncf.quantize(
        model, dataset, subset_size=subset, model_type=nncf.ModelType.TRANSFORMER, ignored_scope=ignored,
        # SmoothQuant is off as in optimum-intel's diffusion recipe: UNet activations are not outlier-heavy.
        advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1),
    )


def _weighted_matmuls(model) -> list[str]:
    """Friendly names of MatMul ops with a constant (possibly converted) weight input, and embedding Gathers."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and any(_constant_source(op.input_value(i).get_node()) for i in (0, 1)):
            names.append(op.get_friendly_name())
        elif kind == "Gather" and _constant_source(op.input_value(0).get_node()) and \
                op.input_value(0).get_element_type().is_real():
            names.append(op.get_friendly_name())
    return names


def _constant_source(node) -> bool:
    """A Constant, possibly behind a Convert (decompression) or a Transpose/Reshape of one."""
    for _ in range(3):
        if node.get_type_name() == "Constant":
            return True
        if node.get_type_name() not in ("Convert", "Transpose", "Reshape"):
            return False
        node = node.input_value(0).get_node()
    return False


def ir_summary(model) -> dict[str, dict[str, int]]:
    """Op counts by type and Constant counts by element type: what a quantized IR really contains."""
    ops: dict[str, int] = {}
    weights: dict[str, int] = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        ops[kind] = ops.get(kind, 0) + 1
        if kind == "Constant":
            et = op.get_output_element_type(0).get_type_name()
            weights[et] = weights.get(et, 0) + 1
    return {"ops": ops, "weights": weights}

