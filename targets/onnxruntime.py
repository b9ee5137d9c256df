"""ONNX Runtime target: the fp32 tree runs as exported; other precisions are variant trees onnx-<precision>/.

A variant tree is laid out exactly like onnx/ (model_index.json, scheduler/, tokenizer*/,
<component>/{model.onnx, model.onnx_data, config.json}, diffprism.json) and is written
atomically. Each component gets a method from the precision's policy (overridable per
component with the `policy` option):

  fp16          every component fp16, with automatic fp32 islands
  bf16          bf16 weights, fp32 compute (ONNX Runtime's CPU provider has no bf16 kernels
                for most ops)
  (UNet below is the export's denoiser: the UNet, or SD3's / Flux's transformer)
  int8          UNet static QDQ int8 (calibrated on the captured denoising inputs; calibrate_method
                MinMax, Entropy or Percentile), VAE fp16, text encoders dynamic int8
  int8-dynamic  UNet and text encoders dynamic int8, VAE fp16
  int4          UNet block-wise int4 weights (MatMulNBits), text encoders dynamic int8, VAE fp16
  pruned        UNet magnitude-pruned (unstructured, or structured with structured=true: tree
                onnx-pruned-structured/) and distilled against the original; others fp32
  qat           UNet fake-quantized int8, distilled, exported as QDQ; others fp32

pruned and qat work on the torch model before export (exporters.compress), so their build
needs the source pipeline, which 'diffprism compile' reloads from the manifest.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from exporters import reference
from exporters.errors import SourceError, UsageError
from exporters.export import ONNX_DIR, REFERENCE_DIR
from exporters.onnx_writer import ONNX_NAME
from exporters.precision.quantize import CALIBRATION_METHODS
from exporters.spec import ComponentSpec
from exporters.tree import TREE_INFO, read_geometry, read_tree_info, write_tree_info
from targets.base import Availability, BuildResult, Inputs, Target, TargetConfig

log = logging.getLogger(__name__)

METHODS = ("fp32", "fp16", "bf16", "int8", "int8-dynamic", "int4", "pruned", "qat")
TORCH_METHODS = ("pruned", "qat")  # compress the torch model and re-export: need the source pipeline
VAE = ("vae_encoder", "vae_decoder")

DENOISER = "denoiser"  # policy key of the export's denoiser (the UNet or the transformer, from its geometry)

# precision -> component -> method; "*" is every other component.
DEFAULT_POLICY: dict[str, dict[str, str]] = {
    "fp16": {"*": "fp16"},
    "bf16": {"*": "bf16"},
    "int8": {DENOISER: "int8", "vae_encoder": "fp16", "vae_decoder": "fp16", "*": "int8-dynamic"},
    "int8-dynamic": {"vae_encoder": "fp16", "vae_decoder": "fp16", "*": "int8-dynamic"},
    "int4": {DENOISER: "int4", "vae_encoder": "fp16", "vae_decoder": "fp16", "*": "int8-dynamic"},
    "pruned": {DENOISER: "pruned", "*": "fp32"},
    "qat": {DENOISER: "qat", "*": "fp32"},
}


class OrtConfig(TargetConfig):
    policy: dict[str, str] = {}  # component -> method, over the precision's defaults
    keep_io_types: bool = True  # fp32 inputs/outputs, so pipelines and runners need no change
    islands: bool = True  # find fp32 islands for fp16 components automatically
    island_rel_l2: float = 5e-3  # an fp16 component's outputs must stay this close to fp32
    island_samples: int = 2  # inputs the island search runs on
    calibration: str = "capture"  # static int8 feeds: "capture" (<out>/calibration) or "reference"
    calibration_samples: int = 16  # captured feeds used for static int8 (spread over the steps)
    # static int8 ranges: onnxruntime.quantization.CalibrationMethod MinMax | Entropy | Percentile.
    # MinMax: best on trained tiny-shapes; Percentile 0.3 dB and Entropy 7 dB below it (docs/benchmarks.md)
    calibrate_method: str = "MinMax"
    calibrate_percentile: float = Field(99.999, gt=0.0, le=100.0)  # Percentile's CalibPercentile
    calibrate_moving_average: bool = False  # MinMax's CalibMovingAverage
    per_channel: bool = True
    block_size: int = 32  # int4 block along K
    accuracy_level: int | None = None  # int4 CPU kernel compute type (4 = int8 activations)
    # pruned / qat (exporters.compress): pruning amount and the distillation that recovers accuracy
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # weights (unstructured) or inner channels (structured) removed
    structured: bool = False
    prune_scope: Literal["global", "layer"] = "global"
    distill_steps: int = Field(20, ge=0)
    distill_lr: float = Field(1e-4, gt=0.0)
    distill_batch: int = Field(2, ge=1)

    @field_validator("calibrate_method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        """Any spelling of a CalibrationMethod member ('entropy', 'Entropy') is that member's name."""
        names = {m.lower(): m for m in CALIBRATION_METHODS}
        if not isinstance(value, str) or value.lower() not in names:
            raise ValueError(f"unknown calibration method {value!r}; choose from {', '.join(CALIBRATION_METHODS)}")
        return names[value.lower()]

    @model_validator(mode="after")
    def _method_settings(self) -> "OrtConfig":
        # A setting the chosen method ignores would name a second variant with the same bytes.
        default = type(self).model_fields["calibrate_percentile"].default
        if self.calibrate_percentile != default and self.calibrate_method != "Percentile":
            raise ValueError("calibrate_percentile applies to calibrate_method=Percentile only")
        if self.calibrate_moving_average and self.calibrate_method != "MinMax":
            raise ValueError("calibrate_moving_average applies to calibrate_method=MinMax only")
        return self


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    precisions = ("fp32", *[m for m in METHODS if m != "fp32"])
    Config = OrtConfig

    tools = ("onnxruntime",)
    named_options = ("structured",)
    folder_prefixes = (ONNX_DIR,)

    def options_of(self, config: TargetConfig) -> dict[str, Any]:
        # fp32 is the exported tree itself: no option changes it.
        return {} if config.precision == "fp32" else super().options_of(config)

    def base_label(self, config: TargetConfig) -> str:
        structured = config.precision == "pruned" and getattr(config, "structured", False)
        return f"{config.precision}-structured" if structured else config.precision

    def output_dir(self, out: Path, config: TargetConfig) -> Path:
        return out / (ONNX_DIR if config.precision == "fp32" else f"{ONNX_DIR}-{self.variant_label(config)}")

    def _methods(self, config: TargetConfig) -> set[str]:
        defaults = DEFAULT_POLICY.get(config.precision, {})
        return set(getattr(config, "policy", {}).values()) | set(defaults.values())

    def needs_source(self, config: TargetConfig) -> bool:
        """True when a component's method compresses the torch model (the caller passes the pipeline)."""
        return bool(self._methods(config) & set(TORCH_METHODS))

    def inputs(self, config: TargetConfig) -> Inputs:
        assert isinstance(config, OrtConfig)
        methods = self._methods(config)
        if "int8" in methods and config.calibration == "capture":
            return Inputs(calibration="required")  # static int8 calibrates on the captured feeds
        if "int8" in methods or ("fp16" in methods and config.islands):
            return Inputs(calibration="optional")  # the island search (or reference calibration) prefers a capture
        return Inputs()

    def availability(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Availability(False, "onnxruntime is not installed", "pip install onnxruntime")
        return Availability(True)

    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        assert isinstance(config, OrtConfig)
        bad = {c: m for c, m in config.policy.items() if m not in METHODS}
        if bad:
            raise UsageError(f"unknown method(s) in policy: {bad}", f"choose from {', '.join(METHODS)}")
        unknown = [c for c in config.policy if c not in specs]
        if unknown:
            raise UsageError(f"policy names component(s) {unknown} that are not in this export", f"exported: {list(specs)}")
        plan = {"target": self.name, "precision": config.precision, "tree": str(tree), "options": config.model_dump()}
        if config.precision == "fp32":
            plan["components"] = {name: {"method": "fp32"} for name in specs}
            return plan
        defaults = DEFAULT_POLICY[config.precision]
        denoiser = read_geometry(tree).denoiser
        plan["components"] = {
            name: {"method": config.policy.get(name, defaults.get(DENOISER if name == denoiser else name, defaults["*"]))}
            for name in specs}
        misplaced = {n: c["method"] for n, c in plan["components"].items()
                     if c["method"] in TORCH_METHODS and c["method"] != config.precision}
        if misplaced:
            raise UsageError(f"method(s) {misplaced} only work in their own precision",
                             "use --precision pruned or --precision qat for them")
        return plan

    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        if plan["precision"] == "fp32":  # the exported tree itself: nothing to build
            return BuildResult(self.name, "fp32", out / ONNX_DIR, note="the exported fp32 tree")
        from exporters.files import staged_dir
        from exporters.precision import graph

        config = OrtConfig(**plan["options"])
        tree = Path(plan["tree"])
        info, specs = read_tree_info(tree)
        from exporters.weights_dtype import require_fp32

        require_fp32(info, f"the ONNX Runtime {config.precision} variant")  # it converts from fp32 weights
        final = self.output_dir(out, config)
        result = BuildResult(self.name, config.precision, final)
        if source is None and any(step["method"] in TORCH_METHODS for step in plan["components"].values()):
            raise UsageError(f"the {config.precision} build needs the source pipeline (it compresses the torch model)",
                             "run it through 'diffprism compile', which reloads the source named in the manifest")
        with staged_dir(final) as stage:
            _copy_pipeline_files(tree, stage, specs)
            for name, step in plan["components"].items():
                work = stage / ".work" / name
                if step["method"] in TORCH_METHODS:
                    details = _compress(source, specs[name], step["method"], config, out, stage / name,
                                        int(info.get("opset", 18)))
                else:
                    details = build_component(tree / name, stage / name, specs[name], step["method"], config, out,
                                              work)
                shutil.copy2(tree / name / "config.json", stage / name / "config.json")
                details["bytes"] = graph.size_bytes(stage / name)
                details["fp32_bytes"] = graph.size_bytes(tree / name)
                result.details[name] = details
                shutil.rmtree(stage / ".work", ignore_errors=True)
            info = {**info, "precision": config.precision, "variant": result.details}
            write_tree_info(stage, info, {n: specs[n] for n in plan["components"]})
        result.files = sorted(p for p in final.rglob("*") if p.is_file())
        return result

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        from runtimes.onnxruntime_runner import OnnxRuntimeRunner

        self.availability().require("ONNX Runtime")
        return OnnxRuntimeRunner(spec, artifact_dir / spec.name / "model.onnx", **options)


def _compress(source: Any, spec: ComponentSpec, method: str, config: OrtConfig, out: Path, dst: Path,
              opset: int) -> dict[str, Any]:
    from exporters.compress import CompressOptions, compress_component

    options = CompressOptions(sparsity=config.sparsity, structured=config.structured, scope=config.prune_scope,
                              distill_steps=config.distill_steps, distill_lr=config.distill_lr,
                              distill_batch=config.distill_batch)
    details = compress_component(source, spec, method, options, out, dst, opset)
    details["ops"] = _quantized_ops(dst)
    return details


def _copy_pipeline_files(tree: Path, stage: Path, specs: dict[str, ComponentSpec]) -> None:
    """model_index.json, scheduler/, tokenizer*/: everything of the tree but the graphs and its info file."""
    for item in tree.iterdir():
        if item.name in specs or item.name == TREE_INFO:
            continue
        if item.is_dir():
            shutil.copytree(item, stage / item.name)
        else:
            shutil.copy2(item, stage / item.name)


def build_component(src: Path, dst: Path, spec: ComponentSpec, method: str, config: OrtConfig, out: Path,
                    work: Path) -> dict[str, Any]:
    """Write dst/{model.onnx, model.onnx_data} for one component; returns its facts for the manifest."""
    from exporters.precision import graph, half, int4, islands, quantize

    work.mkdir(parents=True, exist_ok=True)
    details: dict[str, Any] = {"method": method}
    if method == "fp32":
        graph.save(graph.load(src), dst)
    elif method == "fp16":
        if config.islands:
            # The captured steps, and the reference points validation judges at: the error of fp16
            # differs between shapes and inputs, so the search covers both.
            feeds, details["island_inputs"] = feeds_for(out, spec, "capture-or-reference", config.island_samples)
            if details["island_inputs"] == "capture":
                feeds += feeds_for(out, spec, "reference", 0)[0]
                details["island_inputs"] = "capture+reference"
            report = islands.fp16_with_islands(src, dst, feeds, work, rel_l2=config.island_rel_l2,
                                               keep_io_types=config.keep_io_types)
            details["islands"] = report.to_json()
        else:
            graph.save(half.to_fp16(graph.load(src), keep_io_types=config.keep_io_types, in_place=True), dst)
    elif method == "bf16":
        graph.save(half.to_bf16_weights(graph.load(src)), dst)
    elif method == "int8":
        feeds, details["calibration"] = feeds_for(out, spec, config.calibration, config.calibration_samples)
        details["calibration_samples"] = len(feeds)
        prepared = quantize.prepare(src, work / "prepared")
        quantize.static_int8(prepared, work / "q" / ONNX_NAME, feeds, per_channel=config.per_channel,
                             method=config.calibrate_method, percentile=config.calibrate_percentile,
                             moving_average=config.calibrate_moving_average)
        details["calibrate_method"] = config.calibrate_method
        graph.save(graph.load(work / "q"), dst)  # one data file named as in the tree
    elif method == "int8-dynamic":
        quantize.dynamic_int8(src, work / "q" / ONNX_NAME, work, per_channel=config.per_channel)
        graph.save(graph.load(work / "q"), dst)
    elif method == "int4":
        graph.save(int4.int4_weights(graph.load(src), block_size=config.block_size,
                                     accuracy_level=config.accuracy_level), dst)
        details["block_size"] = config.block_size
    else:
        raise UsageError(f"unknown method '{method}'", f"choose from {', '.join(METHODS)}")
    if config.precision != "fp32":
        details["ops"] = _quantized_ops(dst)
    return details


def _quantized_ops(directory: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(directory / ONNX_NAME), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear",
                            "MatMulNBits", "Cast", "ConvInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def feeds_for(out: Path, spec: ComponentSpec, source: str, limit: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """Inputs for calibration or the island search: captured ones, else the stored reference inputs."""
    from exporters import calibration

    folder = out / calibration.CALIBRATION_DIR
    if source in ("capture", "capture-or-reference") and (folder / f"{spec.name}.npz").is_file():
        feeds = calibration.load_feeds(folder, spec.name)
        return _spread(feeds, limit), "capture"
    if source == "capture":
        raise SourceError(f"static int8 of '{spec.name}' needs captured inputs, and {folder} has none",
                          f"run 'diffprism calibrate {out}' first, or pass --option calibration=reference")
    if source not in ("reference", "capture-or-reference"):
        raise UsageError(f"unknown calibration source '{source}'", "use capture or reference")
    ref = out / REFERENCE_DIR / f"{spec.name}.npz"
    if not ref.is_file():
        raise SourceError(f"no reference inputs for '{spec.name}' at {ref}", "re-run 'diffprism export'")
    return _spread([case["inputs"] for case in reference.load(ref).values()], limit), "reference"


def _spread(feeds: list, limit: int) -> list:
    """At most `limit` feeds, evenly spaced (captured feeds run in step order)."""
    if limit <= 0 or len(feeds) <= limit:
        return feeds
    idx = np.linspace(0, len(feeds) - 1, limit).round().astype(int)
    return [feeds[i] for i in sorted(set(idx))]
