"""PyTorch reference outputs saved next to the export, so validation elsewhere needs no PyTorch run."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from exporters.inputs import make_feed
from exporters.spec import ComponentSpec, iter_points


def torch_outputs(wrapper: nn.Module, spec: ComponentSpec, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in spec.input_names]
    with torch.no_grad():
        out = wrapper(*args)
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {name: t.detach().float().cpu().numpy() for name, t in zip(spec.output_names, out)}


def compute(wrapper: nn.Module, spec: ComponentSpec, points: Iterable[tuple[str, dict[str, int]]] | None = None,
            seed: int = 0) -> dict[str, dict]:
    """{point: {"dims": ..., "inputs": feed, "outputs": torch outputs}} over the spec's validation points."""
    cases = {}
    for i, (name, values) in enumerate(points if points is not None else iter_points(spec)):
        feed = make_feed(spec, values, seed=seed + i)
        cases[name] = {"dims": values, "inputs": feed, "outputs": torch_outputs(wrapper, spec, feed)}
    return cases


def save(cases: Mapping[str, dict], path: Path) -> None:
    arrays = {"__cases__": np.array(json.dumps({k: v["dims"] for k, v in cases.items()}))}
    for point, case in cases.items():
        for kind in ("inputs", "outputs"):
            for name, arr in case[kind].items():
                arrays[f"{point}/{kind}/{name}"] = arr
    save_npz(arrays, path)


def save_npz(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Like np.savez, but byte-identical for identical arrays (fixed zip timestamps, sorted keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arrays[key]), allow_pickle=False)


def load(path: Path) -> dict[str, dict]:
    """The reference cases; a damaged file (or one holding pickled objects) is an IntegrityError (exit 6)."""
    from exporters.errors import IntegrityError

    try:
        with np.load(path, allow_pickle=False) as data:
            dims = json.loads(str(data["__cases__"]))
            cases = {p: {"dims": dict(d), "inputs": {}, "outputs": {}} for p, d in dims.items()}
            for key in data.files:
                if key == "__cases__":
                    continue
                point, kind, name = key.split("/", 2)
                cases[point][kind][name] = data[key]
    except (ValueError, KeyError, TypeError, AttributeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"reference file {path} is damaged ({type(exc).__name__}: {str(exc)[:120]})",
                             "re-run 'diffprism export' to write the PyTorch references again") from None
    return cases
