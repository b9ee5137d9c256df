"""report/report.html holds the images, the comparison and latency tables and the chart, self-contained."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import pytest
from PIL import Image

from diffprism.cli import main
from diffprism.e2e_jobs import bench_job, e2e_job
from diffprism.jobs import validate_job
from diffprism.placement import Placement, resolve
from validation.e2e import requests_for
from validation.report import render


class Page(HTMLParser):
    """Collects <img> sources, table rows (cell texts), SVG rects and any external reference."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.rects = 0
        self.external: list[str] = []
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "rect":
            self.rects += 1
        elif tag in ("script", "link") or (tag == "a" and attrs.get("href", "").startswith("http")):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def png_size(uri: str) -> tuple[int, int]:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = base64.b64decode(uri[len(prefix):])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.fixture(scope="module")
def reported(exported, tmp_path_factory):
    """tiny-sd validated per component and end to end on ONNX Runtime, benched, with its report."""
    import shutil

    out = tmp_path_factory.mktemp("report") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), out)
    validate_job(out, target="onnxruntime", precision="fp32")
    requests = requests_for(["a red cube", "a blue sphere"], size=(32, 48), steps=2)
    e2e_job(out, [resolve(out, Placement("onnxruntime"), {})], requests)
    bench_job(out, [Placement("onnxruntime")], size=(32, 32), steps=1, batch=2, warmup=0, repeat=2, image_runs=1,
              components=["text_encoder", "vae_decoder"])
    return out


def test_report_has_images_tables_and_chart(reported):
    page = parse(reported / "report" / "report.html")
    assert not page.external  # self-contained: no scripts, stylesheets or links to fetch
    # two prompts x (PyTorch + onnxruntime), all 32x48 (HxW) PNGs
    assert len(page.images) == 4
    assert all(png_size(uri) == (48, 32) for uri in page.images)
    component_rows = [r for r in page.rows if len(r) == 10 and r[1] == "onnxruntime-fp32"]
    assert {r[0] for r in component_rows} == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert {r[2] for r in component_rows} == {"deploy: CPUExecutionProvider, fp32 row"}  # how each ran
    assert all(r[-1] == "pass" for r in component_rows)
    latency = [r for r in page.rows if len(r) == 8 and r[0] in ("text_encoder", "vae_decoder")]
    assert {(r[0], r[1]) for r in latency} == {(c, t) for c in ("text_encoder", "vae_decoder")
                                                for t in ("torch", "onnxruntime-fp32")}
    assert all(r[2].replace(".", "").isdigit() for r in latency)  # a measured median, not an error
    images = [r for r in page.rows if len(r) == 6 and r[1].endswith(" s")]  # per-image latency rows
    assert [r[0] for r in images] == ["torch", "onnxruntime-fp32"]
    assert images[1][-1] == "CPUExecutionProvider" and all(r[-1] == "CPUExecutionProvider" for r in latency
                                                          if r[1] == "onnxruntime-fp32")
    assert len(images) == 2
    assert page.rects == 2 + 4  # one bar per image row and per component row
    html = (reported / "report" / "report.html").read_text()
    assert "PSNR" in html and "SSIM" in html and "PASSED" in html


def test_bench_json_records_baseline_ratios_and_machine(reported):
    bench = json.loads((reported / "report" / "bench.json").read_text())
    assert bench["baseline"] == "torch" and "RSS" in bench["memory_method"]
    assert bench["hardware"]["cpu_count"] >= 1
    rows = {(e["component"], e["target"]): e for e in bench["components"]}
    base = rows[("vae_decoder", "torch")]
    ort = rows[("vae_decoder", "onnxruntime-fp32")]
    assert base["speedup"] == pytest.approx(1.0)
    assert ort["speedup"] == pytest.approx(base["median_ms"] / ort["median_ms"])
    assert ort["p90_ms"] >= ort["median_ms"] > 0 and ort["artifact_bytes"] > 0
    assert [e["target"] for e in bench["images"]] == ["torch", "onnxruntime-fp32"]
    manifest = json.loads((reported / "manifest.json").read_text())
    assert "report/report.html" in manifest["files"] and "report/bench.json" in manifest["files"]


def test_report_command_regenerates_the_page(reported, capsys):
    path = reported / "report" / "report.html"
    path.unlink()
    assert main(["--json", "report", str(reported)]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(path.resolve())
    assert len(parse(path).images) == 4


def test_report_escapes_text_and_shows_failures(tmp_path):
    out = tmp_path / "set"
    (out / "report").mkdir(parents=True)
    request = {"prompt": "<script>alert(1)</script>", "negative_prompt": None, "seed": 0, "steps": 2, "height": 8,
               "width": 8, "guidance_scale": 7.5}
    result = {"label": "openvino-int8", "precision": "int8", "placements": {"unet": "openvino-int8"},
              "tolerance": {"latent_rel_l2": 0.35, "psnr": 18.0, "ssim": 0.6}, "passed": False, "error": None,
              "runner": {}, "checks": [{"request": request, "metrics": {"latent_rel_l2": 0.9, "psnr": 9.0, "ssim": 0.1},
                                        "violations": ["PSNR 9.0 dB < 18.0"], "passed": False, "image": ""}]}
    (out / "report" / "validation.json").write_text(json.dumps({"e2e": {"requests": [request], "results": {
        "openvino-int8": result}, "reference": {"images": []}}}))
    html = render(out)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "FAILED" in html and "image missing" in html


def test_report_lists_what_each_precision_variant_did(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    targets = {
        "onnxruntime-fp16": {"dir": "onnx-fp16", "details": {"vae_decoder": {
            "method": "fp16", "bytes": 50, "fp32_bytes": 100, "ops": {"Cast": 9},
            "islands": {"kept_fp32": ["/conv_in/Conv", "/mid/Add"], "clean": True}}}},
        "onnxruntime-pruned": {"dir": "onnx-pruned", "details": {"unet": {
            "method": "pruned", "bytes": 100, "fp32_bytes": 100, "weights": {"sparsity": 0.5},
            "parameters_before": 2_000_000, "parameters_after": 1_500_000,
            "distillation": {"error_before": 0.4, "error_after": 0.1}}}},
        "openvino-fp32": {"dir": "openvino-fp32", "details": {"unet": {"xml": "unet/openvino_model.xml"}}},
    }
    (out / "manifest.json").write_text(json.dumps({"targets": targets}))
    html = render(out)
    assert "Precision variants" in html
    assert "/conv_in/Conv" in html and "0.50×" in html  # the islands kept and the size against fp32
    assert "50.0%" in html and "0.4 → 0.1" in html  # sparsity and distillation error
    assert "1.5 M of 2.0 M" in html  # parameters left
    assert "openvino-fp32" not in html.split("Precision variants")[1].split("</section>")[0]  # no method recorded
