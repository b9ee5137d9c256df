"""The TensorRT refit job: new weights into engines built refittable, without a rebuild.

A refit export (exporters/refit.py) keeps every graph of its base, so the base's TensorRT engines
built with `--option refit=true` (BuilderFlag.REFIT) take the refit's weights through TensorRT's
refitter: the ONNX parser's refitter reads each new model.onnx (+ its external data) and names
every weight as the build did; refit_cuda_engine refuses while get_missing_weights() is non-empty.
Engines built without REFIT (or only REFIT_IDENTICAL, which accepts the build's own weights only)
cannot take other weights: `diffprism compile` builds them from the refit export as from any export.

`write_refit_jobs(base, dst)` copies the base's plan for each refittable TensorRT variant into the
refit export and writes `refit_engines.py` beside it; the script runs on the GPU machine that holds
the base's built engines (`--base ENGINE_DIR`) and writes the refitted ones and engines.json (last).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from exporters.files import write_bytes_atomic
from targets.tensorrt_plan import PLAN_FILE

log = logging.getLogger(__name__)

REFIT_SCRIPT = "refit_engines.py"

_SCRIPT = '''#!/usr/bin/env python3
"""Refits this folder's TensorRT engines from a base build with the weights of this export.

Written by 'diffprism refit'. Run on the GPU machine holding the base export's engines, built with
--option refit=true:  python3 {script} --base PATH/TO/BASE/ENGINE/FOLDER
Every engine is deserialized, refitted from ../<component>/model.onnx through TensorRT's ONNX
refitter (all weights must be supplied: get_missing_weights() must be empty), serialized to a
temporary name and moved into <export>/<base folder name>/ (the same GPU and TensorRT); engines.json
(sha256 of every engine) is written last.
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parent  # the export folder: plan paths are relative to it
PLAN = json.loads((HERE / "{plan}").read_text())


def fail(message):
    sys.exit("{script}: " + message)


def main():
    parser = argparse.ArgumentParser(description="refit the base engines with this export's weights")
    parser.add_argument("--base", required=True, type=Path, help="the base export's engine folder (engines.json)")
    args = parser.parse_args()
    try:
        import tensorrt as trt
    except ImportError:
        fail("the tensorrt Python package is not installed (pip install tensorrt on the GPU machine)")
    if not PLAN["builder"]["refit"]:
        fail("the base engines were not built refittable; build this export instead: diffprism compile")
    built = json.loads((args.base / "engines.json").read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    dest = ARTIFACTS / args.base.resolve().name  # the base's folder name says which GPU and TensorRT
    dest.mkdir(exist_ok=True)
    engines = {{}}
    for name, component in PLAN["components"].items():
        base_engine = args.base / built["engines"][name]["file"]
        engine = runtime.deserialize_cuda_engine(base_engine.read_bytes())
        if engine is None:
            fail(f"{{name}}: could not load {{base_engine}} (another GPU or TensorRT version?)")
        refitter = trt.Refitter(engine, logger)
        onnx = ARTIFACTS / component["onnx"]
        onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
        if not onnx_refitter.refit_from_file(str(onnx)):
            errors = "; ".join(str(onnx_refitter.get_error(i)) for i in range(onnx_refitter.num_errors))
            fail(f"{{name}}: the ONNX refitter rejected {{onnx}}: {{errors}}")
        missing = refitter.get_missing_weights()
        if missing:
            fail(f"{{name}}: weights missing after the refit: {{list(missing)[:5]}}")
        if not refitter.refit_cuda_engine():
            fail(f"{{name}}: refit_cuda_engine failed")
        out = dest / component["engine"]
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_bytes(bytes(engine.serialize()))
        os.replace(partial, out)
        data = out.read_bytes()
        engines[name] = {{"file": component["engine"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        print(f"[{{name}}] refitted from {{onnx}}")
    record = {{key: built[key] for key in ("precision", "gpu", "compute_capability", "trt_version") if key in built}}
    record.update({{"engines": engines, "refit_of": str(args.base)}})
    if dest != HERE:
        for item in ("{plan}", "{script}"):
            (dest / item).write_bytes((HERE / item).read_bytes())
    partial = dest / "engines.json.partial"
    partial.write_text(json.dumps(record, indent=2) + "\\n")
    os.replace(partial, dest / "engines.json")
    print(f"done: {{dest}} (validate with: diffprism validate {{ARTIFACTS}} --target tensorrt)")


if __name__ == "__main__":
    main()
'''


def refit_script() -> str:
    """The refit job's text (deterministic; it reads its plan.json at run time)."""
    return _SCRIPT.format(script=REFIT_SCRIPT, plan=PLAN_FILE)


def write_refit_jobs(base: Path, dst: Path) -> list[str]:
    """For each TensorRT variant of `base` planned refittable, its plan and the refit job in `dst`.

    Returns the folders written; variants not built refittable are logged (compile them from dst).
    """
    written = []
    for plan_path in sorted(Path(base).glob(f"tensorrt-*/{PLAN_FILE}")):
        plan = json.loads(plan_path.read_text())
        folder = plan_path.parent.name
        if not plan.get("builder", {}).get("refit"):
            log.info("%s: engines not built refittable; compile them from the refit export", folder)
            continue
        (Path(dst) / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan_path, Path(dst) / folder / PLAN_FILE)
        script = Path(dst) / folder / REFIT_SCRIPT
        write_bytes_atomic(script, refit_script().encode())
        script.chmod(0o755)
        written.append(folder)
    return written
