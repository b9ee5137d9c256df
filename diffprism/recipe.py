"""Build recipes: one TOML file says what to export, which target x precision variants to build,
how to validate them and where to publish.

```toml
[source]
preset = "tiny-sd"            # or path = "models/sd15", or hub = "org/name" + revision = "<commit>"

components = ["text_encoder", "vae_decoder"]   # optional subset (top-level keys go before any table)
dtype = "bf16"                # storage dtype of the ONNX weights (default fp32), as 'export --dtype'
memory_budget = "20G"         # memory the export may use, as 'export --memory-budget' (not in the content key)

[shapes]
batch = "1:1:2"               # images per call (the denoiser runs twice that under guidance); default as the CLI's

[[build]]
target = "openvino"
precision = "fp16"
options = { }                 # passed to the target's Config

[validation]
prompts = ["a red bicycle"]   # image check of every variant that runs here (steps = 10)

[validation.tolerances.fp16.unet]
rel_l2 = 0.02

[publish]
url = "s3://bucket/releases/tiny-sd"
```

Errors name the key and the line it is on, so a release script's log points at the fix.
"""
from __future__ import annotations

import hashlib
import json
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffprism import presets
from exporters.errors import DiffprismError, ShapeError, UsageError
from exporters.memory import parse_bytes
from exporters.spec import ShapeRequest
from validation.e2e import STEPS as E2E_STEPS
from validation.policy import Policy

EXAMPLE = "see examples/tiny-sd.toml"


class RecipeError(UsageError):
    """The recipe file cannot be used (syntax, unknown key, bad value)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSection(_Model):
    preset: str | None = None
    path: str | None = None
    hub: str | None = None
    revision: str | None = None  # a commit hash keeps Hub builds reproducible
    seed: int = 0  # presets only
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "SourceSection":
        given = [k for k in ("preset", "path", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of preset, path, hub (got {', '.join(given) or 'none'})")
        if self.revision and not self.hub:
            raise ValueError("revision applies to hub sources only")
        return self

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in presets.PRESETS:
            raise ValueError(f"unknown preset '{value}' (choose from {', '.join(presets.PRESETS)})")
        return value

    @property
    def ref(self) -> str:
        return self.preset or self.path or self.hub  # type: ignore[return-value]


def _default_batch() -> str:
    """The CLI's default --batch (exporters.spec.ShapeRequest), as range text."""
    return ":".join(str(n) for n in ShapeRequest().batch)


class ShapesSection(_Model):
    batch: str = Field(default_factory=_default_batch)  # images per call, as `diffprism export --batch`
    size: str | None = None
    sequence: str | None = None
    t5_sequence: str | None = None

    def request(self) -> ShapeRequest:
        return ShapeRequest(
            batch=ShapeRequest.parse_range(self.batch, "batch"),
            image=ShapeRequest.parse_range(self.size, "size") if self.size else None,
            sequence=ShapeRequest.parse_range(self.sequence, "sequence") if self.sequence else None,
            t5_sequence=ShapeRequest.parse_range(self.t5_sequence, "t5 sequence") if self.t5_sequence else None,
        )


class BuildSpec(_Model):
    target: str
    precision: str = "fp32"
    options: dict[str, Any] = Field(default_factory=dict)
    runs_on: list[str] | None = None  # CI runner labels for this build's job (default per target)

    @property
    def variant(self):
        """The one identity of this build (diffprism.variant.Variant): folder, label, stage names, manifest entry."""
        from diffprism.variant import Variant

        return Variant.of(self.target, self.precision, self.options)

    @model_validator(mode="after")
    def _valid_options(self) -> "BuildSpec":
        try:
            self.variant
        except UsageError as exc:
            raise ValueError(exc.message) from None
        return self

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        from targets.base import REGISTRY

        if value not in REGISTRY:
            raise ValueError(f"unknown target '{value}' (choose from {', '.join(REGISTRY)})")
        return value


class Bounds(_Model):
    rel_l2: float | None = None
    cosine: float | None = None
    max_abs: float | None = None


class ValidationSection(_Model):
    # precision -> component -> bounds that replace the default ones
    tolerances: dict[str, dict[str, Bounds]] = Field(default_factory=dict)
    # Image check ('validate --e2e') of every variant that runs here: these prompts (seeds 0, 1, ...) through
    # PyTorch and the variant at the export's preferred size; none: no image check.
    prompts: list[str] = Field(default_factory=list)
    steps: int = Field(E2E_STEPS, ge=1)  # denoising steps per image

    def policy(self) -> Policy:
        policy = Policy()
        for precision, per_component in self.tolerances.items():
            for component, bounds in per_component.items():
                policy = policy.with_override(precision, component, **bounds.model_dump(exclude_none=True))
        return policy


class CalibrationSection(_Model):
    prompts: list[str] | None = None  # default: the built-in prompt set
    steps: int = Field(4, ge=1)
    seed: int = 0
    # what runs the denoising loop, as 'calibrate --runtime': PyTorch, or the exported fp32 graph
    runtime: Literal["torch", "openvino", "onnxruntime", "auto"] = "torch"


class MatrixSection(_Model):
    tensorrt: str = "10"  # TensorRT version a GPU runner must have (becomes a runner label)


class PublishSection(_Model):
    url: str
    force: bool = False


class Recipe(_Model):
    name: str | None = None
    source: SourceSection
    components: list[str] | None = None
    opset: int = 18
    streaming: bool | None = None  # streamed export from a folder source (None: the export's default)
    reference_points: str | None = None  # PyTorch reference points, as 'diffprism export --reference-points'
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # storage dtype of the ONNX weights, as 'export --dtype'
    # Memory the export may use, as 'export --memory-budget' (a machine limit, not part of the content key).
    memory_budget: str | None = None
    shapes: ShapesSection = Field(default_factory=ShapesSection)
    build: list[BuildSpec] = Field(min_length=1)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    matrix: MatrixSection = Field(default_factory=MatrixSection)
    publish: PublishSection | None = None

    @model_validator(mode="after")
    def _readable_budget(self) -> "Recipe":
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget)
            except UsageError as exc:
                raise ValueError(exc.message) from None
        return self

    @model_validator(mode="after")
    def _unique_builds(self) -> "Recipe":
        seen = set()
        for b in self.build:
            if b.variant in seen:
                raise ValueError(f"build {b.variant.id} is listed twice")
            seen.add(b.variant)
        return self

    def select(self, only: list[str] | None) -> list[BuildSpec]:
        """The builds named by --only (a variant id such as openvino:int8-3a3b5af9, its key, or target:precision
        when that names one build); all when none given."""
        if not only:
            return list(self.build)
        chosen = []
        for o in only:
            found = [b for b in self.build if o in (b.variant.id, b.variant.key)] or \
                [b for b in self.build if o == f"{b.target}:{b.precision}"]
            if len(found) != 1:
                what = "is not a build" if not found else "names several builds"
                raise UsageError(f"--only {o} {what} of this recipe",
                                 f"builds: {', '.join(b.variant.id for b in self.build)}")
            chosen.append(found[0])
        return chosen

    def export_options(self) -> dict[str, Any]:
        """Export settings the recipe sets (unset ones keep the export job's defaults)."""
        given = (("streaming", self.streaming), ("reference_points", self.reference_points),
                 ("dtype", self.dtype), ("memory_budget", self.memory_budget))
        return {k: v for k, v in given if v is not None}

    def digest(self, *sections: str) -> str:
        """sha256 of the named sections' canonical JSON: part of every stage key."""
        data = {s: self.model_dump(mode="json").get(s) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def load(path: Path) -> Recipe:
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist", EXAMPLE)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {exc.start})", "save the recipe as UTF-8") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}", "check the path and its permissions") from None
    return parse(text, str(path))


def parse(text: str, name: str = "recipe") -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{name}: not valid TOML: {exc}", "fix the syntax at that line") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        # An unknown key is usually a typo that also explains a "missing" one: report it first.
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = tuple(err["loc"])
        line = find_line(text, loc)
        where = f"{name}:{line}" if line else name
        key = ".".join(str(p) for p in loc) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{where}: {key}: {_message(err)}{more}", EXAMPLE) from None
    try:
        recipe.shapes.request()  # range syntax errors name the key themselves
        recipe.validation.policy()
    except DiffprismError as exc:
        line = find_line(text, ("shapes",)) if isinstance(exc, ShapeError) else find_line(text, ("validation",))
        raise RecipeError(f"{name}:{line}: {exc.message}" if line else f"{name}: {exc.message}", exc.fix or EXAMPLE) from None
    return recipe


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    return err["msg"].removeprefix("Value error, ")


_HEADER = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"""^((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split(dotted: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", dotted)
    return tuple(p.strip("\"'") for p in parts)


def key_lines(text: str) -> dict[tuple, int]:
    """Map every key path in the TOML text (array-of-tables entries indexed) to its 1-based line."""
    lines: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    table: tuple = ()
    depth = 0  # inside a multi-line array: no keys there
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if '"' not in raw and "'" not in raw else raw.strip()
        if not line or line.startswith("#"):
            continue
        if depth:
            depth += line.count("[") - line.count("]")
            continue
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            path = _indexed(_split(header[1]), counts)
            if line.startswith("[["):
                counts[path] = counts.get(path, -1) + 1
                lines.setdefault(path, no)
                path = (*path, counts[path])
            table = path
            lines.setdefault(table, no)
            continue
        key = _KEY.match(line)
        if key:
            path = (*table, *_split(key[1]))
            lines.setdefault(path, no)
            value = line[key.end():]
            depth = max(0, value.count("[") - value.count("]"))
    return lines


def _indexed(path: tuple, counts: dict[tuple, int]) -> tuple:
    """[build.options] after [[build]] belongs to the latest build entry."""
    out: tuple = ()
    for part in path:
        out = (*out, part)
        if out in counts and out != path:
            out = (*out, counts[out])
    return out


def find_line(text: str, loc: tuple) -> int | None:
    """Line of the deepest key of `loc` present in the text (a missing key points at its table)."""
    lines = key_lines(text)
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None
