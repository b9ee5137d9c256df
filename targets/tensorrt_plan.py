"""TensorRT build plans: optimization profiles, builder flags and engine naming, with no TensorRT needed.

A plan is JSON-able data. The same plan drives the Python-API build (targets/tensorrt.py)
and the trtexec build job (targets/tensorrt_job.py), so the two cannot drift apart.
Every path in a plan is relative to the artifact folder (the parent of `onnx/`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field, field_validator

from exporters.errors import ShapeError, SourceError, UsageError
from exporters.export import ONNX_DIR
from exporters.geometry import Geometry
from exporters.onnx_writer import ONNX_NAME
from exporters.spec import POINTS, Axis, ComponentSpec, ShapeRequest
from exporters.tree import read_tree_info
from targets.base import TargetConfig

PLAN_FORMAT = 3  # 2: trt_major, min_trt, the build path in the folder name; 3: options_tag
ENGINE_NAME = "model.plan"
PLAN_FILE = "plan.json"
SCRIPT_FILE = "build_engines.sh"
TIMING_CACHE = "timing.cache"
UNKNOWN = "unknown"

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
# Supported TensorRT: release 10.8 up to 11.x (the majors whose APIs this target is written against).
MIN_TRT = (10, 8)
MAJORS = (10, 11)
DEFAULT_MAJOR = 11  # what `pip install tensorrt` gives today; a plan with nothing to detect targets it
# TensorRT 10.x, weak typing: builder precision flags on the fp32 graph (TensorRT picks per-layer precision).
FLAG_PRECISIONS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}
# Quantized precisions come from a Q/DQ graph and are built strongly typed on every major: the
# graph's types decide, and builder precision flags are not allowed with STRONGLY_TYPED.
QDQ_PRECISIONS = ("int8", "fp8")
# TensorRT 11 removed weak typing (no FP16/BF16/INT8/FP8 builder flags, no trtexec --fp16): every
# precision is built strongly typed from a graph that already carries its types. fp16 comes from
# the fp16-with-fp32-islands variant (onnx-fp16/, `compile --target onnxruntime --precision fp16`),
# so the islands that keep e.g. the SDXL VAE finite carry over to the engine.
TYPED_SOURCES = {"fp32": None, "fp16": "fp16", "int8": "int8", "fp8": "fp8"}  # precision -> onnx-<x>/ (None: onnx/)
# The folder-name tag of each build path: precision from builder flags (10.x) or from the graph's types.
TYPING_TAGS = {False: "flags", True: "typed"}
# Lowest compute capability (major*10+minor) that runs a precision's kernels.
MIN_CC = {"bf16": 80, "fp8": 89}
AMPERE = 80
HARDWARE_LEVELS = {  # option value -> (trt.HardwareCompatibilityLevel member, trtexec spelling)
    "none": ("NONE", "none"),
    "ampere_plus": ("AMPERE_PLUS", "ampere+"),
    "same_compute_capability": ("SAME_COMPUTE_CAPABILITY", "sameComputeCapability"),
}
# Builder features newer than MIN_TRT: option value -> first TensorRT (major, minor) that has it.
HARDWARE_SINCE = {"same_compute_capability": (10, 10)}  # release/10.8 has only none and ampere+


class TensorRtConfig(TargetConfig):
    """Options of `diffprism compile DIR --target tensorrt --option KEY=VALUE`."""

    gpu: str | None = None  # target GPU: "sm89" or "8.9"; None: this machine's GPU, else "unknown"
    trt_version: str | None = None  # "10.8.0", or a major "11"; None: the installed TensorRT, else 11.x
    batch: str | None = None  # narrower batch range MIN:OPT:MAX inside the export's
    sizes: list[str] | None = None  # image-size ranges in pixels, one optimization profile each
    static: bool = False  # every profile at its opt shape (min = opt = max)
    optimization_level: int = Field(3, ge=0, le=5)  # builder optimization level (TensorRT default 3)
    workspace_mb: int | None = Field(None, gt=0)  # workspace memory pool limit
    timing_cache: str | None = None  # path (relative to the artifact folder); default: in the engine folder
    refit: bool = False  # refittable engines (BuilderFlag.REFIT)
    strip_weights: bool = False  # weightless plans, refit from the ONNX weights at load time
    version_compatible: bool = False  # engines that load on later TensorRT versions
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"

    @field_validator("sizes", mode="before")
    @classmethod
    def _one_size(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) else value

    @field_validator("sizes", mode="after")
    @classmethod
    def _sizes_as_text(cls, value: list | None) -> list[str] | None:
        return [str(v) for v in value] if value is not None else None

    @field_validator("gpu", "trt_version", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value


# --- GPU and version tags --------------------------------------------------------------


def parse_gpu(text: str) -> int:
    """'sm89', 'sm_89', '8.9', '89' -> 89 (compute capability as major*10+minor)."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?", text.strip().lower())
    if not m:
        raise UsageError(f"GPU '{text}' is not a compute capability", "write it like sm89 or 8.9")
    major, minor = m.groups()
    if minor is not None:
        return int(major) * 10 + int(minor)
    if len(major) < 2:
        raise UsageError(f"GPU '{text}' is not a compute capability", "write it like sm89 or 8.9")
    return int(major)


def cc_text(cc: int) -> str:
    return f"{cc // 10}.{cc % 10}"


def parse_trt_version(text: str) -> str:
    """'10.8' -> '10.8.0'; '10.8.0.43' -> '10.8.0' (engines are tagged by major.minor.patch); '11' -> '11'."""
    parts = text.strip().split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise UsageError(f"TensorRT version '{text}' is not a version number", "write it like 10.8.0 (or a major: 11)")
    return parts[0] if len(parts) == 1 else ".".join((parts + ["0"])[:3])


def trt_target(config_version: str | None, detected: str | None) -> tuple[int, str]:
    """(major, version or "unknown") the plan is for: the option, else the installed TensorRT, else 11.x.

    A major alone ("11") fixes the build path and leaves the exact version to the build job.
    """
    text = parse_trt_version(config_version) if config_version else detected
    if text is None:
        return DEFAULT_MAJOR, UNKNOWN
    numbers = tuple(int(p) for p in text.split("."))
    major = numbers[0]
    supported = f"{MIN_TRT[0]}.{MIN_TRT[1]} to {MAJORS[-1]}.x"
    if major not in MAJORS or (len(numbers) > 1 and numbers[:2] < MIN_TRT):
        raise UsageError(f"TensorRT {text} is not supported (diffprism builds engines with TensorRT {supported})",
                         f"use TensorRT {supported}, or pass --option trt_version= with one of those")
    return major, text if len(numbers) > 1 else UNKNOWN


def strongly_typed(precision: str, major: int) -> bool:
    """Whether the build takes its precision from the graph's types (always on 11; Q/DQ graphs on 10)."""
    return major >= 11 or precision in QDQ_PRECISIONS


def version_tag(major: int, trt_version: str) -> str:
    """'10.8.0', or '11' when only the major is known (the build job adds the rest)."""
    return trt_version if trt_version != UNKNOWN else str(major)


def engine_dir_name(precision: str, gpu_tag: str, trt_version: str, typed: bool, options_tag: str = "") -> str:
    """tensorrt-<precision>-sm<cc>-trt<version>-<flags|typed><options_tag>: an engine only loads on the GPU and
    TensorRT it was built for, and the same precision is built two ways (builder flags on 10.x, graph types on 11);
    options_tag is the variant's options suffix (Target.options_suffix: '' or '-3fa2c1d0')."""
    return f"tensorrt-{precision}-{gpu_tag}-trt{trt_version}-{TYPING_TAGS[typed]}{options_tag}"


def gpu_tag(cc: int | None, hardware: str) -> str:
    if hardware == "ampere_plus":
        return f"sm{AMPERE}plus"  # one engine for every GPU from Ampere on
    return f"sm{cc}" if cc is not None else f"sm{UNKNOWN}"


# --- profiles ----------------------------------------------------------------------------


def dynamic_inputs(spec: ComponentSpec) -> list[str]:
    """Inputs with at least one dynamic axis in the exported ONNX graph (static dims are exported as numbers)."""
    dynamic = {d.name for d in spec.dims if not d.is_static}
    return [t.name for t in spec.inputs if any(isinstance(a, Axis) and a.dim in dynamic for a in t.axes)]


def profile_specs(spec: ComponentSpec, config: TensorRtConfig, scale: int, batch_factor: int = 1
                  ) -> list[ComponentSpec]:
    """One narrowed spec per optimization profile (checked against the exported ranges).

    `config.batch` counts images; batch_factor is the component's batch per image (2 for the
    denoiser under classifier-free guidance, as in TensorRT's diffusion demo)."""
    base = spec
    if config.batch and "batch" in {d.name for d in spec.dims}:
        images = ShapeRequest.parse_range(config.batch, "batch")
        base = base.restrict(batch=tuple(b * batch_factor for b in images))
    names = {d.name for d in spec.dims}
    variants = [base]
    if config.sizes and {"height", "width"} <= names:
        variants = [base.restrict(height=r, width=r) for r in (_latent_range(s, base, scale) for s in config.sizes)]
    if config.static:
        variants = [v.restrict(**{d.name: (d.opt, d.opt, d.opt) for d in v.dims}) for v in variants]
    unique: list[ComponentSpec] = []
    for v in variants:  # a text encoder has no image dims: several sizes give it one profile
        if all(v.dims != u.dims for u in unique):
            unique.append(v)
    return unique


def _latent_range(text: str, spec: ComponentSpec, scale: int) -> tuple[int, int, int]:
    pixels = ShapeRequest.parse_range(text, "size")
    step = scale * spec.dim("height").multiple_of
    for px in pixels:
        if px % step:
            raise ShapeError(
                f"{spec.name}: image size {px} px is not a multiple of {step} "
                f"(latents are multiples of {spec.dim('height').multiple_of}, VAE scale {scale})",
                f"use a multiple of {step}, e.g. {max(step, px - px % step)}",
            )
    return tuple(px // scale for px in pixels)  # type: ignore[return-value]


def profiles(spec: ComponentSpec, config: TensorRtConfig, scale: int,
             batch_factor: int = 1) -> list[dict[str, dict[str, list[int]]]]:
    """[{input: {min, opt, max}}] per profile, for the inputs the ONNX graph leaves dynamic."""
    wanted = dynamic_inputs(spec)
    out = []
    for narrowed in profile_specs(spec, config, scale, batch_factor):
        shapes = narrowed.profile()
        out.append({name: {p: list(shapes[name][p]) for p in POINTS} for name in wanted})
    return out


# --- the plan ------------------------------------------------------------------------------


def make_plan(tree: Path, specs: Mapping[str, ComponentSpec], config: TensorRtConfig, *,
              detected_cc: int | None = None, detected_trt: str | None = None,
              geometry: Geometry, options_tag: str = "") -> dict[str, Any]:
    """What would be built, from the specs and the config; `detected_*` describe this machine (None: no GPU/TensorRT);
    `options_tag` ends the engine folder's name (the variant's options suffix)."""
    precision = config.precision
    cc = parse_gpu(config.gpu) if config.gpu else detected_cc
    major, trt_version = trt_target(config.trt_version, detected_trt)
    _check_precision(precision, cc, config)
    typed = strongly_typed(precision, major)
    _check_features(config, major, trt_version)
    out = tree.parent
    source = source_tree(precision, major)
    _check_source(out, source, specs, precision, major)
    tag = gpu_tag(cc, config.hardware_compatibility)
    directory = engine_dir_name(precision, tag, version_tag(major, trt_version), typed, options_tag)
    scale = geometry.vae_scale_factor
    timing_cache = config.timing_cache or f"{directory}/{TIMING_CACHE}"
    components = {}
    for name, spec in sorted(specs.items()):  # sorted: the plan and job text do not depend on export order
        components[name] = {
            "onnx": f"{source}/{name}/{ONNX_NAME}",
            "engine": f"{name}/{ENGINE_NAME}",  # inside the engine folder
            "profiles": profiles(spec, config, scale, geometry.batch_factor(name)),
        }
    return {
        "format": PLAN_FORMAT,
        "target": "tensorrt",
        "precision": precision,
        "gpu": tag,
        "compute_capability": cc_text(cc) if cc is not None else UNKNOWN,
        "min_compute_capability": _min_cc(precision, config),
        "trt_version": trt_version,
        "trt_major": major,
        "min_trt": _min_trt(config),
        "dir": directory,
        "options_tag": options_tag,
        "source": source,
        "network": {"strongly_typed": typed},
        "builder": {
            "precision_flags": [] if typed else list(FLAG_PRECISIONS[precision]),
            "tf32": precision != "fp32",  # fp32 means fp32: TF32 would cost ~3 decimal digits
            "optimization_level": config.optimization_level,
            "workspace_bytes": config.workspace_mb * 2**20 if config.workspace_mb else None,
            "timing_cache": timing_cache,
            "refit": config.refit,
            "strip_weights": config.strip_weights,
            "version_compatible": config.version_compatible,
            "hardware_compatibility": config.hardware_compatibility,
        },
        "components": components,
    }


def _min_cc(precision: str, config: TensorRtConfig) -> int:
    need = MIN_CC.get(precision, 0)
    return max(need, AMPERE) if config.hardware_compatibility == "ampere_plus" else need


def _check_precision(precision: str, cc: int | None, config: TensorRtConfig) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"TensorRT has no precision '{precision}'", f"choose from {', '.join(PRECISIONS)}")
    if precision == "fp8" and config.hardware_compatibility == "ampere_plus":
        raise UsageError("fp8 engines cannot be Ampere-compatible (Ampere GPUs have no FP8 units)",
                         "drop --option hardware_compatibility=ampere_plus or build fp16/bf16")
    need = MIN_CC.get(precision)
    if cc is not None and need is not None and cc < need:
        raise UsageError(
            f"{precision} needs a GPU with compute capability >= {cc_text(need)}, but the target is sm{cc}",
            "build fp16 for this GPU, or pass --option gpu=sm89 (or newer) for a GPU that has it",
        )
    if cc is not None and config.hardware_compatibility == "ampere_plus" and cc < AMPERE:
        raise UsageError(f"Ampere-compatible engines must be built on sm80 or newer, not sm{cc}",
                         "build on an Ampere or newer GPU, or drop hardware_compatibility")


def source_tree(precision: str, major: int) -> str:
    """The ONNX tree a build reads: onnx/ for weak typing and fp32, onnx-<variant>/ for typed reduced precision."""
    if not strongly_typed(precision, major):
        return ONNX_DIR
    if precision not in TYPED_SOURCES:  # bf16 on TensorRT 11
        raise UsageError(
            f"TensorRT {major} builds {precision} only strongly typed from a graph computing in {precision}, and "
            f"diffprism's onnx-{precision} variant stores {precision} weights but computes in fp32",
            "build fp16 (strongly typed from the fp16-with-islands graphs of onnx-fp16/), or plan for TensorRT 10.x "
            "with --option trt_version=10.8.0, where bf16 is a builder flag",
        )
    variant = TYPED_SOURCES[precision]
    return ONNX_DIR if variant is None else f"{ONNX_DIR}-{variant}"


def _min_trt(config: TensorRtConfig) -> list[int]:
    """The oldest TensorRT (major, minor) that can build this plan (the job checks it before building)."""
    return list(max([MIN_TRT, HARDWARE_SINCE.get(config.hardware_compatibility, MIN_TRT)]))


def _check_features(config: TensorRtConfig, major: int, trt_version: str) -> None:
    need = HARDWARE_SINCE.get(config.hardware_compatibility)
    if need is None or trt_version == UNKNOWN:
        return  # a major alone: the job checks the exact version
    if tuple(int(p) for p in trt_version.split(".")[:2]) < need:
        raise UsageError(
            f"hardware_compatibility={config.hardware_compatibility} needs TensorRT >= {need[0]}.{need[1]}, "
            f"but the plan targets {trt_version}",
            f"use TensorRT {need[0]}.{need[1]} or newer, or hardware_compatibility=ampere_plus / none",
        )


def _check_source(out: Path, source: str, specs: Mapping[str, ComponentSpec], precision: str, major: int) -> None:
    if source == ONNX_DIR:
        return  # the exported fp32 tree, checked by the caller
    missing = [n for n in specs if not (out / source / n / ONNX_NAME).is_file()]
    if precision == "fp16":
        _check_fp16_source(out, source, specs, missing, major)
        return
    if not missing:
        return
    if precision == "int8":
        raise SourceError(
            f"TensorRT int8 builds the Q/DQ graph strongly typed, but {out / source} has no {', '.join(missing)}",
            f"run 'diffprism calibrate {out}' and 'diffprism compile {out} --target onnxruntime --precision int8' first",
        )
    raise SourceError(
        f"TensorRT fp8 builds an FP8 Q/DQ graph strongly typed, but {out / source} has no {', '.join(missing)}",
        f"put FP8 Q/DQ graphs at {source}/<component>/{ONNX_NAME} (e.g. from NVIDIA Model Optimizer), "
        "or build fp16/bf16",
    )


def _check_fp16_source(out: Path, source: str, specs: Mapping[str, ComponentSpec], missing: list[str],
                       major: int) -> None:
    """TensorRT 11's fp16 reads the fp16-with-islands variant: every planned component must be fp16 there."""
    fix = (f"run 'diffprism compile {out} --target onnxruntime --precision fp16' first (the fp16 graphs with "
           "fp32 islands), or plan for TensorRT 10.x with --option trt_version=10.8.0 (fp16 as a builder flag)")
    if missing:
        raise SourceError(f"TensorRT {major} builds fp16 strongly typed from the fp16 graphs, but {out / source} "
                          f"has no {', '.join(missing)}", fix)
    try:
        info, _ = read_tree_info(out / source)
    except SourceError:
        raise SourceError(f"{out / source} is not a diffprism variant tree", fix) from None
    methods = {n: (info.get("variant", {}).get(n) or {}).get("method") for n in specs}
    not_fp16 = {n: m for n, m in methods.items() if m != "fp16"}
    if not_fp16:
        raise SourceError(f"TensorRT {major} fp16 needs fp16 graphs, but {out / source} holds {not_fp16}", fix)


def engine_ranges(component: Mapping[str, Any]) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Per profile, {input: (min shape, max shape)} from a planned component (what the engine will accept)."""
    return [{name: (tuple(s["min"]), tuple(s["max"])) for name, s in prof.items()} for prof in component["profiles"]]
