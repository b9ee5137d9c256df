"""Web target: web-<precision>/, a static page that generates images in the browser on ONNX Runtime Web.

The bundle, served as plain files (no build step):

  index.html, main.mjs, pipeline.mjs, tokenizer.mjs, scheduler.mjs   the page (targets/web_assets/page/)
  ort/                          onnxruntime-web, vendored from npm (targets/web_runtime.py)
  <component>/model.onnx (+ model.onnx_data)   text_encoder, unet, vae_decoder
  tokenizer/tokenizer.json, scheduler/scheduler_config.json   as the exported tree has them
  bundle.json                   what the page reads: components, their files, the geometry

Weights come from the ONNX Runtime target's precision passes (fp16 with fp32 islands, dynamic
int8), so each file is one that ONNX Runtime already validates. The page runs on WebGPU
(with WASM for the nodes WebGPU lacks) when the browser has an adapter, else on WASM.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from exporters.errors import SourceError, UsageError
from exporters.files import staged_dir, write_json_atomic
from exporters.onnx_writer import ONNX_NAME
from exporters.spec import ComponentSpec
from exporters.tree import read_geometry, read_tree_info
from targets.base import Availability, BuildResult, Inputs, Target, TargetConfig

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("web_assets") / "page"
BUNDLE_INFO = "bundle.json"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # what the page's text-to-image loop runs
UNET_INPUTS = {"sample", "timestep", "encoder_hidden_states"}  # no added conditioning (SDXL) in the page yet
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler")  # the classes scheduler.mjs implements
RUNNER_OPTIONS = ("backend", "threads", "chromium", "timeout")  # validate --option for the browser run

# precision -> component -> ONNX Runtime method (targets.onnxruntime.build_component).
POLICY = {
    "fp32": {"*": "fp32"},
    "fp16": {"*": "fp16"},
    "int8": {"vae_decoder": "fp16", "*": "int8-dynamic"},  # dynamic: no calibration, runs on WASM kernels
}

# Browser limits (ONNX Runtime Web, "Working with large models"): the graph file is one protobuf and
# one ArrayBuffer (Chrome's largest is 0x7fe00000 bytes); weights live in WebAssembly memory (4 GiB).
GRAPH_LIMIT = 0x7FE00000
MEMORY_LIMIT = 4 << 30


class WebConfig(TargetConfig):
    policy: dict[str, str] = {}  # component -> method, over the precision's defaults
    max_component_bytes: int = MEMORY_LIMIT  # a component's weights must fit WebAssembly memory
    islands: bool = True  # fp16: keep the fp32 islands ONNX Runtime's search finds


class WebTarget(Target):
    name = "web"
    precisions = tuple(POLICY)
    Config = WebConfig
    tools = ("onnx", "onnxruntime")
    runs_as_pipeline = True

    def availability(self) -> Availability:
        if shutil.which("npm") is None:
            from targets import web_runtime

            if not web_runtime.cached():
                return Availability(False, "npm is not installed (the bundle vendors onnxruntime-web from npm)",
                                    "apt-get install -y npm")
        return Availability(True)

    def plan(self, tree: Path, specs: dict[str, ComponentSpec], config: TargetConfig) -> dict[str, Any]:
        from targets.onnxruntime import METHODS

        assert isinstance(config, WebConfig)
        missing = [c for c in COMPONENTS if c not in specs]
        if missing:
            raise UsageError(f"the web page needs {missing}, which this export or selection lacks",
                             f"export (and select) all of {', '.join(COMPONENTS)}")
        extra = set(specs["unet"].input_names) - UNET_INPUTS
        if extra:
            raise UsageError(f"the web page runs UNets with inputs {sorted(UNET_INPUTS)}; this one also takes "
                             f"{sorted(extra)} (added conditioning)", "export an SD 1.x/2.x pipeline for the web target")
        scheduler = json.loads((tree / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        if scheduler not in SCHEDULERS:
            raise UsageError(f"the web page has no JS implementation of {scheduler}",
                             f"export with one of {', '.join(SCHEDULERS)}")
        if not (tree / "tokenizer" / "tokenizer.json").is_file():
            raise SourceError(f"{tree}/tokenizer has no tokenizer.json, which the page's tokenizer reads",
                              "re-export with a transformers version that saves the fast tokenizer")
        bad = {c: m for c, m in config.policy.items() if m not in METHODS or c not in COMPONENTS}
        if bad:
            raise UsageError(f"bad policy entries {bad}", f"components {COMPONENTS}, methods {', '.join(METHODS)}")
        defaults = POLICY[config.precision]
        components = {c: {"method": config.policy.get(c, defaults.get(c, defaults["*"]))} for c in COMPONENTS}
        return {"target": self.name, "precision": config.precision, "tree": str(tree), "options": config.model_dump(),
                "components": components}

    def inputs(self, config: TargetConfig) -> Inputs:
        assert isinstance(config, WebConfig)
        # fp16's island search (shared with ONNX Runtime) prefers a calibration capture when one exists.
        return Inputs(calibration="optional") if config.precision == "fp16" and config.islands else Inputs()

    def build(self, plan: dict[str, Any], out: Path, source: Any = None) -> BuildResult:
        from exporters.precision import graph
        from targets import web_runtime
        from targets.onnxruntime import OrtConfig, build_component

        config = WebConfig(**plan["options"])
        tree = Path(plan["tree"])
        info, specs = read_tree_info(tree)
        final = self.output_dir(out, config)
        result = BuildResult(self.name, config.precision, final)
        ort_config = OrtConfig(precision=config.precision, islands=config.islands)
        with staged_dir(final) as stage:
            web_runtime.vendor(stage)
            for item in PAGE.iterdir():
                shutil.copy2(item, stage / item.name)
            for folder in ("tokenizer", "scheduler"):
                shutil.copytree(tree / folder, stage / folder)
            bundle: dict[str, Any] = {"precision": config.precision, "family": info.get("family"),
                                      "geometry": page_geometry(tree, specs), "components": {},
                                      "onnxruntime_web": web_runtime.locked_version()}
            for name, step in plan["components"].items():
                dst = stage / name
                details = build_component(tree / name, dst, specs[name], step["method"], ort_config, out,
                                          stage / ".work" / name)
                shutil.rmtree(stage / ".work", ignore_errors=True)
                shutil.copy2(tree / name / "config.json", dst / "config.json")
                details["bytes"] = graph.size_bytes(dst)
                check_browser_limits(name, dst, config.max_component_bytes)
                bundle["components"][name] = {"model": ONNX_NAME, "external_data": external_data(dst),
                                              "method": step["method"], "bytes": details["bytes"]}
                result.details[name] = details
            write_json_atomic(stage / BUNDLE_INFO, bundle)
        result.files = sorted(p for p in final.rglob("*") if p.is_file())
        result.note = f"serve it: python -m http.server -d {final} (then open http://127.0.0.1:8000/)"
        return result

    def runner(self, artifact_dir: Path, spec: ComponentSpec, **options: Any):
        """The bundle's own ONNX files on ONNX Runtime (Python): the component-level check of what the page loads."""
        from runtimes.onnxruntime_runner import OnnxRuntimeRunner

        if not (artifact_dir / spec.name / ONNX_NAME).is_file():
            raise SourceError(f"the web bundle has no {spec.name} (it holds {', '.join(COMPONENTS)})",
                              f"validate with --components {','.join(COMPONENTS)}")
        return OnnxRuntimeRunner(spec, artifact_dir / spec.name / ONNX_NAME, **options)

    def pipeline_runner(self, artifact_dir: Path, **options: Any):
        """The whole bundle in headless Chromium (runtimes.browser): what validation judges by its image."""
        from runtimes.browser import BrowserPipeline

        unknown = sorted(set(options) - set(RUNNER_OPTIONS))
        if unknown:
            raise UsageError(f"the web runner has no option(s) {unknown}", f"valid: {', '.join(RUNNER_OPTIONS)}")
        return BrowserPipeline(artifact_dir, **options)


def page_geometry(tree: Path, specs: dict[str, ComponentSpec]) -> dict[str, Any]:
    """What the page's loop needs: the pipeline's geometry (from the tree info) and the exported ranges."""
    geometry = read_geometry(tree)
    unet, text = specs["unet"], specs["text_encoder"]
    scale = geometry.vae_scale_factor
    return {
        "vae_scale": scale,
        "latent_channels": geometry.latent_channels,
        "latent_multiple": geometry.pixel_multiple,
        "default_height": unet.dim("height").opt * scale,
        "default_width": unet.dim("width").opt * scale,
        "max_sequence": text.dim("sequence").max,
        "scaling_factor": geometry.scaling_factor,
        "shift_factor": geometry.shift_factor or 0.0,
    }


def external_data(directory: Path) -> list[str]:
    """The external data files model.onnx names (the page passes each to ONNX Runtime Web)."""
    import onnx

    model = onnx.load(str(directory / ONNX_NAME), load_external_data=False)
    return sorted({entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for entry in t.external_data if entry.key == "location"})


def check_browser_limits(name: str, directory: Path, max_bytes: int) -> None:
    graph_bytes = (directory / ONNX_NAME).stat().st_size
    if graph_bytes > GRAPH_LIMIT:
        raise UsageError(f"{name}/model.onnx is {graph_bytes} bytes: over the {GRAPH_LIMIT} bytes a browser "
                         "loads as one protobuf ArrayBuffer", "keep the weights in external data")
    from exporters.precision import graph

    total = graph.size_bytes(directory)
    if total > max_bytes:
        raise UsageError(f"{name} is {total / 2**20:.1f} MiB: over the {max_bytes / 2**20:.1f} MiB a browser session "
                         "can hold (ONNX Runtime Web keeps weights in WebAssembly memory, 4 GiB at most)",
                         "build --precision fp16 or int8, or export a smaller model")
