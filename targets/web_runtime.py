"""onnxruntime-web for the browser bundle: installed from npm by its lock file, vendored into each bundle.

The repository keeps only targets/web_assets/{package.json, package-lock.json} (a few KB);
`npm ci` installs the locked version into a cache keyed by the lock file's hash
($DIFFPRISM_CACHE or ~/.cache/diffprism, then web-runtime/<hash>/), once per machine. A
bundle gets the few files its page loads (the WebGPU build's ES module and its WASM), so it
is self-contained: no CDN at run time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from exporters.errors import BackendUnavailable
from exporters.files import staged_dir

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("web_assets")
PACKAGE = "onnxruntime-web"
# The WebGPU build runs both the webgpu and the wasm execution providers; it loads the asyncify WASM.
FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")


def locked_version() -> str:
    lock = json.loads((ASSETS / "package-lock.json").read_text())
    return lock["packages"][f"node_modules/{PACKAGE}"]["version"]


def _cache_root() -> Path:
    root = os.environ.get("DIFFPRISM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "diffprism"


def _folder() -> Path:
    lock = (ASSETS / "package-lock.json").read_bytes()
    return _cache_root() / "web-runtime" / hashlib.sha256(lock).hexdigest()[:16]


def cached() -> bool:
    dist = _folder() / "node_modules" / PACKAGE / "dist"
    return all((dist / f).is_file() for f in FILES)


def installed(timeout: float = 600.0) -> Path:
    """The dist/ folder of the locked onnxruntime-web, installed with `npm ci` on first use."""
    folder = _folder()
    dist = folder / "node_modules" / PACKAGE / "dist"
    if cached():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise BackendUnavailable(f"the web target vendors {PACKAGE} {locked_version()} from npm, and npm is not installed",
                                 "apt-get install -y npm (or install Node.js with npm)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(folder) as stage:  # a half-finished install is never taken for the cache
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(ASSETS / name, stage / name)
        log.info("installing %s %s with npm ci", PACKAGE, locked_version())
        done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=stage, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise BackendUnavailable(f"npm ci of {PACKAGE} failed: {done.stderr.strip()[-500:]}",
                                     "check that the npm registry is reachable")
    missing = [f for f in FILES if not (dist / f).is_file()]
    if missing:
        raise BackendUnavailable(f"{PACKAGE} {locked_version()} has no {missing}",
                                 "update FILES in targets/web_runtime.py to the package's dist/ layout")
    return dist


def vendor(bundle: Path) -> list[Path]:
    """Copy the runtime into bundle/ort/ (with its license); returns the files written."""
    dist = installed()
    dst = bundle / "ort"
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        shutil.copy2(dist / name, dst / name)
        written.append(dst / name)
    license_file = dist.parent / "LICENSE"
    if license_file.is_file():
        shutil.copy2(license_file, dst / "LICENSE")
        written.append(dst / "LICENSE")
    return written
