"""A web bundle run in headless Chromium: a local HTTP server, the browser, and the DevTools protocol.

The bundle is served from 127.0.0.1 by http.server in a thread (with the cross-origin
isolation headers that let ONNX Runtime Web use WASM threads). Chromium is Debian's system
browser, started headless with a fresh profile and no network services; it is driven over
the DevTools protocol on a pipe (--remote-debugging-pipe: no port, no websocket library).
Nothing here downloads a browser.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import BackendUnavailable, DiffprismError, UsageError

log = logging.getLogger(__name__)

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--mute-audio", "--remote-debugging-pipe")
# WebGPU is behind this flag on Linux; with --disable-gpu the adapter is Chromium's software one (SwiftShader).
WEBGPU_FLAGS = ("--enable-unsafe-webgpu",)
INSTALL = "apt-get update && apt-get install -y chromium"


def find_chromium() -> str | None:
    """$DIFFPRISM_CHROMIUM, else chromium (Debian) on PATH."""
    configured = os.environ.get("DIFFPRISM_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(DiffprismError):
    """The page failed (a JS exception, a timeout): the run failed, not the tool."""


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")  # crossOriginIsolated: WASM threads
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


class StaticServer:
    """http.server over one folder on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, root: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self) -> "StaticServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Chromium:
    """Headless Chromium with one DevTools connection over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, executable: str | None = None, flags: tuple[str, ...] = ()):
        self.executable = executable or find_chromium()
        self.flags = flags
        if not self.executable:
            raise BackendUnavailable("Chromium is not installed (the web target is validated in headless Chromium)",
                                     INSTALL)
        self.profile = tempfile.mkdtemp(prefix="diffprism-chromium-")
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._buffer = b""

    def __enter__(self) -> "Chromium":
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        high = (os.dup(to_browser_r), os.dup(from_browser_w))  # above 4, so the child's dup2 cannot clobber them

        def wire() -> None:  # in the child: only 3 and 4 survive exec (Python's own fds are close-on-exec)
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self._log = open(Path(self.profile) / "chromium.log", "wb")  # a file: a full pipe would block Chromium
        self.proc = subprocess.Popen([self.executable, *FLAGS, *self.flags, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     close_fds=False, preexec_fn=wire)
        for fd in (to_browser_r, from_browser_w, *high):
            os.close(fd)
        try:
            self.version = self.call("Browser.getVersion", timeout=30)["product"]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except DiffprismError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"DevTools {method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first event `method` of a session, waiting for it if it has not come yet (consumed)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read(deadline, method))

    def _read(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer {method} in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                self._log.flush()
                err = (Path(self.profile) / "chromium.log").read_bytes().decode(errors="replace")[-800:]
                raise BackendUnavailable(f"Chromium exited: {err.strip() or 'no message'}", INSTALL)
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def open(self, url: str) -> "Tab":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, session)
        tab.call("Emulation.setDeviceMetricsOverride", {"width": 900, "height": 1200, "deviceScaleFactor": 1,
                                                        "mobile": False})  # the whole page in a screenshot
        tab.call("Runtime.enable")
        tab.call("Page.enable")
        tab.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", session)  # module scripts have run by then
        return tab


class Tab:
    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 300.0) -> Any:
        """Run JS (awaiting a promise) and return its JSON value; a JS exception is a BrowserError."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                                "timeout": int(timeout * 1000)}, timeout=timeout + 10)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"the page failed: {text}{self.console_tail()}")
        return result["result"].get("value")

    def console_tail(self, lines: int = 5) -> str:
        found = [" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"].get("args", []))
                 for e in self.browser.events if e.get("method") == "Runtime.consoleAPICalled"]
        return f" (console: {' | '.join(found[-lines:])})" if found else ""

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])


@dataclass
class BrowserGeneration:
    image: np.ndarray  # HWC float32 in [0, 1], read back from the canvas
    latents: np.ndarray  # final latents before the VAE
    seconds: float
    timings: dict[str, Any]
    backend: str  # "webgpu" or "wasm": what the page ran on
    screenshot: bytes = b""
    details: dict[str, Any] = field(default_factory=dict)


class BrowserPipeline:
    """A web bundle served locally and opened in headless Chromium; generate() drives window.diffprism."""

    backend_name = "onnxruntime-web"

    def __init__(self, bundle: Path, backend: str = "wasm", threads: int = 1, chromium: str | None = None,
                 timeout: float = 600.0):
        if backend not in ("wasm", "webgpu", "auto"):
            raise UsageError(f"unknown browser backend '{backend}'", "use --option backend=wasm, webgpu or auto")
        # One WASM thread by default: on a shared CI machine threads contend more than they help.
        self.bundle, self.backend, self.threads, self.timeout = Path(bundle), backend, int(threads), timeout
        self.chromium = chromium

    def __enter__(self) -> "BrowserPipeline":
        self._server = StaticServer(self.bundle).__enter__()
        try:
            flags = WEBGPU_FLAGS if self.backend != "wasm" else ()
            self._browser = Chromium(self.chromium, flags).__enter__()
            self.tab = self._browser.open(f"{self._server.url}index.html?backend={self.backend}&threads={self.threads}")
            self.info = self.tab.evaluate("window.diffprism.ready.then((api) => ({backend: api.info.backend, "
                                          "webgpu: api.info.webgpu, threads: api.info.threads, load: api.info.loadTimings}))", self.timeout)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if getattr(self, "_browser", None) is not None:
            self._browser.__exit__(*exc)
            self._browser = None
        self._server.__exit__(*exc)

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend_name, "browser": self._browser.version, "provider": self.info["backend"],
                "threads": str(self.info["threads"]), "webgpu": self.info["webgpu"]}

    def generate(self, prompt: str, latents: np.ndarray, *, steps: int, guidance_scale: float,
                 negative_prompt: str | None = None, height: int, width: int) -> BrowserGeneration:
        opts = {"prompt": prompt, "negativePrompt": negative_prompt or "", "steps": steps,
                "guidanceScale": guidance_scale, "height": height, "width": width,
                "latents": base64.b64encode(np.ascontiguousarray(latents, dtype="<f4").tobytes()).decode()}
        start = time.perf_counter()
        r = self.tab.evaluate(f"window.diffprism.generateForCheck({json.dumps(opts)})", self.timeout)
        seconds = time.perf_counter() - start
        rgba = np.frombuffer(base64.b64decode(r["rgba"]), dtype=np.uint8).reshape(r["height"], r["width"], 4)
        final = np.frombuffer(base64.b64decode(r["latents"]), dtype="<f4").reshape(latents.shape).copy()
        image = rgba[..., :3].astype(np.float32) / 255.0
        return BrowserGeneration(image, final, seconds, r["timings"], r["backend"], self.tab.screenshot(),
                                 {"load": r["load"], "webgpu": r["webgpu"]})
