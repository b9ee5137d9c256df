"""Component specs: the single source of truth for tensor names, dtypes and dynamic dims.

ONNX dynamic axes, TensorRT optimization profiles, OpenVINO shapes, Core ML flexible
shapes and validation inputs are all derived from a `ComponentSpec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from exporters.errors import ShapeError, UsageError

POINTS = ("min", "opt", "max")


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension with its range and preferred value (all inclusive)."""

    name: str
    min: int
    opt: int
    max: int
    multiple_of: int = 1
    # A derived dim is the product of other dims, each divided by `per` (Flux's packed latent tokens are
    # height/2 * width/2): its value at any point follows from theirs (see `derived`).
    product_of: tuple[str, ...] = ()
    per: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "product_of", tuple(self.product_of))  # JSON gives a list
        if not (1 <= self.min <= self.opt <= self.max):
            raise ShapeError(
                f"dim '{self.name}': need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}",
                "order the range as MIN:OPT:MAX",
            )
        for label in POINTS:
            value = getattr(self, label)
            if value % self.multiple_of:
                raise ShapeError(
                    f"dim '{self.name}': {label}={value} is not a multiple of {self.multiple_of}",
                    f"use multiples of {self.multiple_of}",
                )

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def at(self, point: str) -> int:
        if point not in POINTS:
            raise ValueError(f"unknown shape point {point!r}; expected one of {POINTS}")
        return getattr(self, point)

    def check(self, value: int, what: str = "") -> None:
        where = f" of {what}" if what else ""
        if not self.min <= value <= self.max:
            raise ShapeError(
                f"dim '{self.name}'{where} = {value} is outside the exported range [{self.min}, {self.max}]",
                "re-export with a wider range or use a size inside it",
            )
        if value % self.multiple_of:
            raise ShapeError(
                f"dim '{self.name}'{where} = {value} is not a multiple of {self.multiple_of}",
                f"use a multiple of {self.multiple_of}",
            )

    def value_from(self, values: Mapping[str, int]) -> int:
        """A derived dim's value given its source dims' values."""
        product = 1
        for name in self.product_of:
            product *= values[name] // self.per
        return product

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max, "multiple_of": self.multiple_of}
        if self.product_of:
            data.update(product_of=list(self.product_of), per=self.per)
        return data


def derived(name: str, sources: Iterable[Dim], per: int = 1) -> Dim:
    """The dim that is the product of `sources`, each divided by `per`, over their ranges."""
    sources = list(sources)
    for d in sources:
        if d.multiple_of % per:
            raise ShapeError(f"dim '{d.name}' must be a multiple of {per} to derive '{name}'",
                             f"use multiples of {per}")
    ranges = [1, 1, 1]
    for d in sources:
        ranges = [r * (v // per) for r, v in zip(ranges, (d.min, d.opt, d.max))]
    return Dim(name, *ranges, product_of=tuple(d.name for d in sources), per=per)


@dataclass(frozen=True)
class Axis:
    """One axis of a tensor that follows a dynamic dim, possibly scaled: scale / per times the dim
    (image = 8 * latent; a UNet's down-block residual = latent / 4)."""

    dim: str
    scale: int = 1
    per: int = 1  # divisor: fractions of a dim (the dim's multiple_of must make them whole)

    def size(self, value: int) -> int:
        """The axis' length when its dim is `value`."""
        return value * self.scale // self.per

    def label(self) -> str:
        text = self.dim if self.scale == 1 else f"{self.scale}*{self.dim}"
        return text if self.per == 1 else f"{text}/{self.per}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"dim": self.dim, "scale": self.scale}
        if self.per != 1:
            data["per"] = self.per
        return data


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: dtype (numpy name) and axes, each an int (static) or an `Axis`."""

    name: str
    dtype: str
    axes: tuple[int | Axis, ...]
    # Valid value range for generated inputs (token ids, timesteps); None means N(0, 1).
    value_range: tuple[float, float] | None = None

    @property
    def rank(self) -> int:
        return len(self.axes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "axes": [a if isinstance(a, int) else a.to_json() for a in self.axes],
            "value_range": list(self.value_range) if self.value_range else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        axes = tuple(a if isinstance(a, int) else Axis(a["dim"], a.get("scale", 1), a.get("per", 1)) for a in data["axes"])
        vr = data.get("value_range")
        return cls(data["name"], data["dtype"], axes, tuple(vr) if vr else None)


@dataclass(frozen=True)
class ComponentSpec:
    """Inputs, outputs and the dynamic dims they share (e.g. `batch` in every input)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {d.name for d in self.dims}
        for d in self.dims:
            if any(src not in known for src in d.product_of):
                raise ValueError(f"{self.name}: dim {d.name!r} is derived from dims not in the spec: {d.product_of}")
        for t in (*self.inputs, *self.outputs):
            for a in t.axes:
                if isinstance(a, Axis) and a.dim not in known:
                    raise ValueError(f"{self.name}.{t.name} uses unknown dim {a.dim!r}")
                if isinstance(a, Axis) and a.per > 1 and (self.dim(a.dim).multiple_of * a.scale) % a.per:
                    raise ValueError(f"{self.name}.{t.name}: {a.label()} is not whole for every value of "
                                     f"{a.dim!r} (a multiple of {self.dim(a.dim).multiple_of})")

    # -- lookups -----------------------------------------------------------------------
    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(f"{self.name} has no dim {name!r}; dims are {[d.name for d in self.dims]}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no input {name!r}")

    # -- shapes ------------------------------------------------------------------------
    def dim_values(self, point: str | Mapping[str, int] = "opt") -> dict[str, int]:
        """Values of every dim at a named point, with overrides from a mapping checked against the spec."""
        if isinstance(point, str):
            return self._derive({d.name: d.at(point) for d in self.dims}, set())
        values = {d.name: d.opt for d in self.dims}
        given = set()
        for name, value in point.items():
            if name not in values:
                continue  # a point may name dims of other components (e.g. sequence for the VAE)
            self.dim(name).check(int(value), self.name)
            values[name] = int(value)
            given.add(name)
        return self._derive(values, given)

    def _derive(self, values: dict[str, int], given: set[str]) -> dict[str, int]:
        """Derived dims follow their sources (unless the point names the derived value itself)."""
        for d in self.dims:
            if d.product_of and d.name not in given:
                values[d.name] = d.value_from(values)
                d.check(values[d.name], self.name)
        return values

    def shape(self, tensor: TensorSpec, values: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(a if isinstance(a, int) else a.size(values[a.dim]) for a in tensor.axes)

    def input_shapes(self, point: str | Mapping[str, int] = "opt") -> dict[str, tuple[int, ...]]:
        values = self.dim_values(point)
        return {t.name: self.shape(t, values) for t in self.inputs}

    def output_shapes(self, point: str | Mapping[str, int] = "opt") -> dict[str, tuple[int, ...]]:
        values = self.dim_values(point)
        return {t.name: self.shape(t, values) for t in self.outputs}

    def profile(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """min/opt/max shape of every input: what a TensorRT optimization profile needs."""
        return {t.name: {p: self.shape(t, self.dim_values(p)) for p in POINTS} for t in self.inputs}

    def restrict(self, **ranges: tuple[int, int, int]) -> "ComponentSpec":
        """A copy with some dims narrowed (must stay inside the original range)."""
        dims = []
        for d in self.dims:
            if d.name in ranges:
                lo, opt, hi = ranges[d.name]
                for v in (lo, hi):
                    d.check(v, self.name)
                dims.append(Dim(d.name, lo, opt, hi, d.multiple_of))
            else:
                dims.append(d)
        by_name = {d.name: d for d in dims}
        dims = [derived(d.name, [by_name[s] for s in d.product_of], d.per) if d.product_of else d for d in dims]
        return ComponentSpec(self.name, self.inputs, self.outputs, tuple(dims), self.meta)

    # -- feeds -------------------------------------------------------------------------
    def check_feed(self, feed: Mapping[str, Any]) -> dict[str, int]:
        """Raise ShapeError unless the feed matches names, dtypes, ranks and dim ranges; return dim values."""
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            raise ShapeError(
                f"{self.name}: feed has wrong inputs (missing {missing}, unexpected {extra})",
                f"feed exactly {self.input_names}",
            )
        seen: dict[str, int] = {}
        for t in self.inputs:
            arr = feed[t.name]
            dtype = np.dtype(_np_dtype_name(arr.dtype))
            if dtype != np.dtype(t.dtype):
                raise ShapeError(f"{self.name}.{t.name}: dtype {dtype} but the spec says {t.dtype}", f"cast to {t.dtype}")
            shape = tuple(arr.shape)
            if len(shape) != t.rank:
                raise ShapeError(f"{self.name}.{t.name}: rank {len(shape)} but the spec says {t.rank}", "fix the input shape")
            for i, (axis, size) in enumerate(zip(t.axes, shape)):
                if isinstance(axis, int):
                    if size != axis:
                        raise ShapeError(
                            f"{self.name}.{t.name}: axis {i} is {size} but must be {axis}", "fix the input shape"
                        )
                    continue
                if (size * axis.per) % axis.scale:
                    raise ShapeError(
                        f"{self.name}.{t.name}: axis {i} = {size} is not a multiple of {axis.scale}", "fix the input shape"
                    )
                value = size * axis.per // axis.scale
                if seen.setdefault(axis.dim, value) != value:
                    raise ShapeError(
                        f"{self.name}.{t.name}: dim '{axis.dim}' is {value} here but {seen[axis.dim]} in another input",
                        "give every input the same value for a shared dim",
                    )
                self.dim(axis.dim).check(value, f"{self.name}.{t.name}")
        for d in self.dims:  # a derived dim must agree with its sources where the feed shows them
            if d.product_of and d.name in seen and all(s in seen for s in d.product_of):
                if d.value_from(seen) != seen[d.name]:
                    raise ShapeError(
                        f"{self.name}: dim '{d.name}' is {seen[d.name]} but {' * '.join(d.product_of)} "
                        f"(each / {d.per}) gives {d.value_from(seen)}", "fix the input shapes")
        return seen

    # -- serialisation -----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": [d.to_json() for d in self.dims],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ComponentSpec":
        return cls(
            data["name"],
            tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            tuple(Dim(**d) for d in data["dims"]),
            data.get("meta", {}),
        )


def _np_dtype_name(dtype: Any) -> str:
    """numpy dtype name of a numpy or torch dtype."""
    text = str(dtype)
    return text.removeprefix("torch.")


@dataclass(frozen=True)
class ShapeRequest:
    """What the user asks for, in pixels and batch: turned into per-component dims.

    `batch` counts images; `image` is in pixels; latent dims are image // vae_scale_factor and
    must be multiples of the geometry's latent multiple (the UNet's down/upsamplers need it).
    """

    batch: tuple[int, int, int] = (1, 1, 2)  # images (exporters.geometry.dims_for scales the denoiser's)
    image: tuple[int, int, int] | None = None  # None: derived from the model's sample size
    sequence: tuple[int, int, int] | None = None  # None: the tokenizer's max length, static
    # T5 token count (SD3, Flux): None: the family's max_sequence_length (SD3 256, Flux 512), static
    t5_sequence: tuple[int, int, int] | None = None

    @staticmethod
    def parse_range(text: str, what: str) -> tuple[int, int, int]:
        """'512' -> (512, 512, 512); '256:512:768' -> (256, 512, 768)."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ShapeError(f"{what} range {text!r} is not integers", "write N or MIN:OPT:MAX, e.g. 256:512:768") from None
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise ShapeError(f"{what} range {text!r} needs one or three values", "write N or MIN:OPT:MAX")
        lo, opt, hi = parts
        if not (1 <= lo <= opt <= hi):
            raise ShapeError(f"{what} range {text!r}: need 1 <= MIN <= OPT <= MAX", "order the range as MIN:OPT:MAX")
        return lo, opt, hi


def dim_opt(specs: Mapping[str, ComponentSpec], name: str) -> int | None:
    """The opt value of dim `name` in the specs (e.g. the exported T5 length), None if none has it."""
    for spec in specs.values():
        if any(d.name == name for d in spec.dims):
            return spec.dim(name).opt
    return None


REFERENCE_POINTS = ("standard", "all", "opt")
DEFAULT_REFERENCE_POINTS = "standard"


def select_points(spec: ComponentSpec, which: str = DEFAULT_REFERENCE_POINTS) -> list[tuple[str, dict[str, int]]]:
    """The points PyTorch references are computed at.

    "standard" (default): min, opt, and a small off-square point (min height, one step up in width
    and batch): several shapes, so a dynamic-shape bug away from the opt point shows, and the opt
    point static builds are checked at, for little more than the opt point costs (the max point of
    a UNet costs many times a typical call). "all": every validation point (iter_points). "opt": the
    opt point only.
    """
    if which not in REFERENCE_POINTS:
        raise UsageError(f"unknown reference points '{which}'", f"use one of {', '.join(REFERENCE_POINTS)}")
    if which == "opt":
        return [("opt", spec.dim_values("opt"))]
    if which == "all":
        return list(iter_points(spec))
    small = {d.name: d.min for d in spec.dims if not d.product_of}
    for name in ("width", "batch"):  # one step up where the dim is dynamic
        if name in small:
            d = spec.dim(name)
            small[name] = min(d.max, d.min + d.multiple_of)
    small = spec.dim_values(small)  # derived dims follow
    points, seen = [], []
    for name, values in (("min", spec.dim_values("min")), ("opt", spec.dim_values("opt")), ("small", small)):
        if values not in seen:
            seen.append(values)
            points.append((name, values))
    return points


def iter_points(spec: ComponentSpec) -> Iterable[tuple[str, dict[str, int]]]:
    """Named shape points for validation: min, opt, max, plus non-square and batch > 1 where the spec allows."""
    seen: set[tuple] = set()
    points: list[tuple[str, dict[str, int]]] = [(p, spec.dim_values(p)) for p in POINTS]
    names = {d.name for d in spec.dims}
    sources = {d.name for d in spec.dims if not d.product_of}

    def point(base: str, **changes: int) -> dict[str, int]:  # derived dims follow the changed sources
        values = {k: v for k, v in spec.dim_values(base).items() if k in sources}
        return spec.dim_values({**values, **changes})

    if {"height", "width"} <= names:
        h, w = spec.dim("height"), spec.dim("width")
        if h.max > h.min or w.max > w.min:
            points.append(("nonsquare", point("opt", height=h.min, width=w.max)))
    if "batch" in names and spec.dim("batch").max > 1:
        points.append(("batch", point("min", batch=min(3, spec.dim("batch").max))))
    for name, values in points:
        key = tuple(sorted(values.items()))
        if key not in seen:
            seen.add(key)
            yield name, values
