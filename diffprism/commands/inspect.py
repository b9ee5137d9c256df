"""diffprism inspect DIR: what an output folder holds (components, shapes, targets, verdicts)."""
from __future__ import annotations

import argparse

from diffprism import manifest
from diffprism.commands.common import out_dir
from exporters.errors import SourceError


def register(sub) -> None:
    p = sub.add_parser("inspect", help="summarise an output folder from its manifest")
    p.add_argument("dir", type=out_dir)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    data = manifest.load(args.dir)
    if data is None:
        raise SourceError(f"{args.dir} has no manifest.json", "inspect a folder written by diffprism")
    export = data.get("stages", {}).get("export", {})
    rows = []
    for name, comp in export.get("components", {}).items():
        spec = comp["spec"]
        ins = "; ".join(f"{t['name']}[{','.join(str(a) if isinstance(a, int) else a['dim'] for a in t['axes'])}]"
                        for t in spec["inputs"])
        dims = ", ".join(f"{d['name']} {d['min']}/{d['opt']}/{d['max']}" for d in spec["dims"])
        rows.append([name, ins, dims, f"{comp['bytes'] / 1e6:.1f} MB"])
    ui.info(f"source: {data.get('source', {})}")
    ui.table(f"components ({export.get('family', '?')}, opset {export.get('opset', '?')})",
             ["component", "inputs", "dims min/opt/max", "size"], rows)
    targets = [[k, v.get("dir", ""), v.get("note", "")] for k, v in data.get("targets", {}).items()]
    if targets:
        ui.table("targets", ["variant", "folder", "note"], targets)
    verdicts = [[k, "pass" if v["passed"] else "FAIL", v.get("status", ""), f"{v.get('failed', 0)}/{v.get('comparisons', 0)}"]
                for k, v in data.get("validation", {}).items()]
    if verdicts:
        ui.table("validation", ["variant", "verdict", "kind", "failed"], verdicts)
    total = sum(f["size"] for f in data.get("files", {}).values())
    ui.info(f"{len(data.get('files', {}))} files, {total / 1e6:.1f} MB; versions: "
            + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()))
    ui.emit({"ok": True, "manifest": data})
    return 0
