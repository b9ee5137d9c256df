"""report/report.html: one self-contained page (images as base64 PNG, charts as inline SVG, no scripts).

Built only from files in the output folder (report/validation.json, report/bench.json,
report/generations.json, report/images/, manifest.json), so it can be regenerated
anywhere, any time, without running a model.
"""
from __future__ import annotations

import base64
import json
import logging
import math
from html import escape
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from exporters.errors import IntegrityError
from exporters.files import write_bytes_atomic
from exporters.paths import check_relpath, printable, resolve_inside

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_HTML = "report.html"


class _Json(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Generation(_Json):
    report_image: str = ""
    request: dict[str, Any] = Field(default_factory=dict)


class _E2E(_Json):
    requests: list[dict[str, Any]] = Field(default_factory=list)
    results: dict[str, dict[str, Any]] = Field(default_factory=dict)
    reference: dict[str, Any] = Field(default_factory=dict)


SCHEMAS: dict[str, type[BaseModel]] = {  # the report JSON files diffprism reads back
    "validation.json": create_model("ValidationJson", __base__=_Json, results=(dict[str, dict[str, Any]], {}),
                                    e2e=(_E2E | None, None)),
    "generations.json": create_model("GenerationsJson", __base__=_Json, generations=(list[_Generation], [])),
    "bench.json": create_model("BenchJson", __base__=_Json, images=(list[dict[str, Any]], []),
                               components=(list[dict[str, Any]], []), settings=(dict[str, Any], {})),
    "manifest.json": _Json,
}


def read_json(path: Path) -> dict[str, Any]:
    """A report JSON file, checked against its schema ({} when absent; IntegrityError when damaged)."""
    if not path.is_file():
        return {}
    fix = f"delete {path.name} (the next command writes it again) or rebuild the set"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid UTF-8 JSON ({type(exc).__name__})", fix) from None
    try:
        SCHEMAS.get(path.name, _Json).model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(printable(str(p)) for p in err["loc"]) or "(top level)"
        raise IntegrityError(f"{path}: {where}: {err['msg']}", fix) from None
    return data


_load = read_json


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _badge(passed: bool | None, text: str | None = None) -> str:
    if passed is None:
        return f'<span class="badge muted">{_e(text or "n/a")}</span>'
    cls = "pass" if passed else "fail"
    return f'<span class="badge {cls}">{_e(text or ("pass" if passed else "FAIL"))}</span>'


def _num(value: Any, fmt: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return format(value, fmt)


def _bytes(n: Any) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(columns: list[str], rows: Iterable[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _img(out: Path, rel: str, alt: str) -> str:
    """Embeds a PNG under report/ only: the path comes from a JSON file anyone could edit."""
    if not rel:
        return f'<div class="missing">{_e(alt)}: image missing</div>'
    path = resolve_inside(out, rel, "report image")
    if check_relpath(rel).parts[0] != REPORT_DIR or not rel.lower().endswith(".png"):
        raise IntegrityError(f"report image '{printable(rel)}' is not a PNG under {REPORT_DIR}/",
                             "the report JSON was tampered with: delete it, or rebuild the set")
    if not path.is_file():
        return f'<div class="missing">{_e(alt)}: image missing</div>'
    raw = path.read_bytes()
    if not raw.startswith(PNG_SIGNATURE):
        raise IntegrityError(f"report image '{printable(rel)}' is not a PNG file", "rebuild the set")
    data = base64.b64encode(raw).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


# --- sections -----------------------------------------------------------------------------


def structural_text(result: dict[str, Any]) -> str:
    """How a structural verdict reads everywhere: checked as far as this machine can, never passed or failed."""
    reason = str(result.get("numerics_skipped") or "")
    need = reason[reason.find("need"):].split(" (")[0] if "need" in reason else "numerics did not run here"
    return f"structural ({'numerics ' + need if need.startswith('need') else need})"


def _summary(manifest: dict[str, Any], validation: dict[str, Any]) -> str:
    verdicts, structural = [], []
    for key, r in sorted((validation.get("results") or {}).items()):
        if r.get("status") == "structural" and r.get("structure_ok"):
            structural.append((f"{key}: {structural_text(r)}"))  # a third verdict: not passed, not failed
        else:
            verdicts.append((f"{key} components", bool(r.get("passed"))))
    for key, r in sorted(((validation.get("e2e") or {}).get("results") or {}).items()):
        verdicts.append((f"{key} images", r.get("passed")))
    chips = "".join(_badge(ok, f"{'✔' if ok else '✘'} {label}") for label, ok in verdicts) + \
        "".join(f'<span class="badge structural">◐ {_e(text)}</span>' for text in structural) or \
        '<span class="badge muted">nothing validated yet</span>'
    overall = all(ok for _, ok in verdicts) if verdicts else None
    source = manifest.get("source") or {}
    name = source.get("preset") or source.get("repo_id") or source.get("path") or "unknown source"
    export = (manifest.get("stages") or {}).get("export") or {}
    facts = [("source", name), ("family", export.get("family", "?")), ("opset", export.get("opset", "?")),
             ("updated", manifest.get("updated") or manifest.get("created") or "?")]
    facts_html = "".join(f"<div><span>{_e(k)}</span><b>{_e(v)}</b></div>" for k, v in facts)
    verdict = {True: "PASSED", False: "FAILED", None: "NOT VALIDATED"}[overall]
    cls = {True: "pass", False: "fail", None: "muted"}[overall]
    if structural and overall is not False:
        # Numerics that could not run here are neither a pass nor a failure: say which and why.
        what = "STRUCTURAL " + structural[0].split(": ", 1)[1].removeprefix("structural ")
        verdict = f"PASSED + {what}" if overall else what
        cls = "structural"
    return (f'<header><div class="title"><h1>diffprism report</h1><span class="verdict {cls}">{verdict}</span></div>'
            f'<div class="facts">{facts_html}</div><div class="chips">{chips}</div></header>')


def _images(out: Path, validation: dict[str, Any]) -> str:
    section = validation.get("e2e") or {}
    requests = section.get("requests") or []
    results = section.get("results") or {}
    if not requests:
        return _card("Images", '<p class="note">No end-to-end run yet: <code>diffprism validate DIR --e2e</code>.</p>')
    ref_images = (section.get("reference") or {}).get("images") or []
    labels = sorted(results)
    head = '<div class="cell head">prompt</div><div class="cell head">PyTorch (reference)</div>' + "".join(
        f'<div class="cell head">{_e(label)} {_badge(results[label].get("passed"))}</div>' for label in labels)
    cells = []
    for i, req in enumerate(requests):
        meta = f'seed {req["seed"]} · {req["steps"]} steps · {req["height"]}×{req["width"]} · cfg {req["guidance_scale"]}'
        cells.append(f'<div class="cell prompt"><q>{_e(req["prompt"])}</q><small>{_e(meta)}</small></div>')
        ref = ref_images[i] if i < len(ref_images) else ""
        cells.append(f'<figure class="cell">{_img(out, ref, "PyTorch")}<figcaption>reference</figcaption></figure>')
        for label in labels:
            checks = results[label].get("checks") or []
            if i >= len(checks):
                err = results[label].get("error") or "not run"
                cells.append(f'<figure class="cell"><div class="missing">{_e(err)}</div></figure>')
                continue
            c, m = checks[i], checks[i]["metrics"]
            caption = (f'PSNR {_num(m.get("psnr"), ".1f")} dB · SSIM {_num(m.get("ssim"), ".4f")}<br>'
                       f'latent rel L2 {_num(m.get("latent_rel_l2"), ".2e")} {_badge(c.get("passed"))}')
            bad = "; ".join(c.get("violations") or [])
            title = f' title="{_e(bad)}"' if bad else ""
            shot = (f'<details><summary>page screenshot</summary>{_img(out, c["screenshot"], "screenshot")}</details>'
                    if c.get("screenshot") else "")
            cells.append(f'<figure class="cell"{title}>{_img(out, c.get("image", ""), label)}'
                         f'<figcaption>{caption}</figcaption>{shot}</figure>')
    columns = len(labels) + 2
    tolerances = _table(["variant", "judged as", "latent rel L2 ≤", "PSNR ≥", "SSIM ≥", "runs on"], [
        [_e(label), _e(results[label].get("precision")), _num(results[label]["tolerance"]["latent_rel_l2"]),
         _num(results[label]["tolerance"]["psnr"], ".1f") + " dB", _num(results[label]["tolerance"]["ssim"]),
         _e(", ".join(f"{k}: {v}" for k, v in (results[label].get("placements") or {}).items()))]
        for label in labels], "compact")
    grid = f'<div class="grid" style="grid-template-columns: 14rem repeat({columns - 1}, minmax(10rem, 1fr))">' \
           f'{head}{"".join(cells)}</div>'
    return _card("Images: PyTorch vs each target", grid + tolerances)


def runs_as(describe: dict[str, Any] | None) -> str:
    """One runner's configuration as it ran (device and compute precision read back, or providers)."""
    d = describe or {}
    if d.get("inference_precision"):
        return f"{d.get('device', '')} {d['inference_precision']}".strip()
    if d.get("providers"):
        return str(d["providers"])
    return str(d.get("backend", ""))


def _pipeline_runs_as(runners: dict[str, Any] | None) -> str:
    return ", ".join(dict.fromkeys(runs_as(d) for d in (runners or {}).values()))


def _components(validation: dict[str, Any]) -> str:
    results = validation.get("results") or {}
    if not results:
        return _card("Per-component comparison", '<p class="note">No component validation yet: '
                     '<code>diffprism validate DIR</code>.</p>')
    rows = []
    for key in sorted(results):
        r = results[key]
        by_component: dict[tuple[str, str], list[dict]] = {}
        for c in r.get("comparisons") or []:  # the deploy check and, beside it, the weights-only one
            by_component.setdefault((c["component"], c.get("check", "deploy")), []).append(c)
        for (component, check), comps in by_component.items():
            ran = (r.get("runner") or {}).get(component) if check == "deploy" else \
                ((r.get("weights_only") or {}).get(component) or {}).get("runner")
            how = f"{check.replace('_', ' ')}: {runs_as(ran)}" + (f", {comps[0]['row']} row" if comps[0].get("row") else "")
            metrics = [o["metrics"] for c in comps for o in c.get("outputs") or [] if o.get("metrics")]
            worst_rel = max((m["rel_l2"] for m in metrics), default=None)
            worst_cos = min((m["cosine"] for m in metrics), default=None)
            worst_abs = max((m["max_abs"] for m in metrics), default=None)
            passed = sum(bool(c.get("passed")) for c in comps)
            problems = sorted({v for c in comps for o in c.get("outputs") or [] for v in o.get("violations") or []}
                              | {c["error"] for c in comps if c.get("error")})
            tol = comps[0].get("tolerance") or {}
            rows.append([f"<b>{_e(component)}</b>", _e(key), _e(how), _e(r.get("status", "numeric")),
                         f"{passed}/{len(comps)}", _num(worst_rel, ".2e"), _num(worst_cos, ".6f"),
                         _num(worst_abs, ".2e"), _e(", ".join(f"{k} {v}" for k, v in tol.items())),
                         _badge(passed == len(comps)) + (f'<div class="why">{_e("; ".join(problems[:3]))}</div>'
                                                         if problems else "")])
        if r.get("status") == "structural":
            for component, facts in (r.get("structure") or {}).items():
                ok = bool(facts.get("ok"))
                badge = (f'<span class="badge structural">{_e(structural_text(r))}</span>' if ok
                         else _badge(False, "structure FAILED"))
                rows.append([f"<b>{_e(component)}</b>", _e(key), "–", "structural", "not run", "–", "–", "–", "–",
                             badge + (f'<div class="why">{_e("; ".join(facts.get("problems") or []))}</div>'
                                      if facts.get("problems") else "")])
    table = _table(["component", "variant", "runs as", "status", "points passed", "worst rel L2", "worst cosine",
                    "worst max abs", "tolerance", "verdict"], rows)
    return _card("Per-component comparison with PyTorch", table)


def _bar_chart(entries: list[tuple[str, float, bool]], unit: str) -> str:
    """Horizontal bars, one per (label, value); the baseline bar is grey."""
    if not entries:
        return ""
    width, label_w, bar_h, gap = 760, 260, 22, 8
    top = max(v for _, v, _ in entries) or 1.0
    height = len(entries) * (bar_h + gap) + gap
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value, baseline) in enumerate(entries):
        y = gap + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 110) * value / top)
        color = "#9aa5b1" if baseline else "#3b82f6"
        parts.append(f'<text x="{label_w - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{_e(label)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" fill="{color}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.7:.1f}">{value:,.1f} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bench(bench: dict[str, Any]) -> str:
    if not bench:
        return _card("Latency", '<p class="note">No benchmark yet: <code>diffprism bench DIR</code>.</p>')
    s = bench.get("settings") or {}
    baseline = bench.get("baseline", "torch")
    intro = (f'<p class="note">{_e(s.get("size", ["?", "?"])[0])}×{_e(s.get("size", ["?", "?"])[-1])} px, '
             f'{_e(s.get("steps"))} steps, component batch {_e(s.get("batch"))}, {_e(s.get("warmup"))} warm-up + '
             f'{_e(s.get("repeat"))} timed runs; baseline: {_e(baseline)} eager. Memory: '
             f'{_e(bench.get("memory_method", ""))}.</p>')
    img_rows, img_bars = [], []
    for e in bench.get("images") or []:
        if "error" in e:
            img_rows.append([_e(e["target"]), "–", "–", "–", "–", f'<span class="why">{_e(e["error"])}</span>'])
            continue
        img_rows.append([_e(e["target"]), _num(e["median_ms"] / 1e3, ".2f") + " s", _num(e["p90_ms"] / 1e3, ".2f") + " s",
                         _num(e.get("speedup"), ".2f") + "×", _bytes(e.get("peak_rss_delta_bytes")),
                         _e(_pipeline_runs_as(e.get("runner")))])
        img_bars.append((e["target"], e["median_ms"] / 1e3, e["target"] == baseline))
    comp_rows, comp_bars = [], []
    for e in bench.get("components") or []:
        if "error" in e:
            comp_rows.append([f"<b>{_e(e['component'])}</b>", _e(e["target"]), "–", "–", "–", "–",
                              _bytes(e.get("artifact_bytes")), f'<span class="why">{_e(e["error"])}</span>'])
            continue
        comp_rows.append([f"<b>{_e(e['component'])}</b>", _e(e["target"]), _num(e["median_ms"], ".1f"),
                          _num(e["p90_ms"], ".1f"), _num(e.get("speedup"), ".2f") + "×",
                          _bytes(e.get("peak_rss_delta_bytes")), _bytes(e.get("artifact_bytes")),
                          _e(runs_as(e.get("runner")))])
        comp_bars.append((f"{e['component']} · {e['target']}", e["median_ms"], e["target"] == baseline))
    html = intro
    if img_rows:
        html += "<h3>Per image</h3>" + _table(["variant", "median", "p90", "speedup", "peak RSS Δ", "runs as / note"],
                                              img_rows)
        html += _bar_chart(img_bars, "s")
    html += "<h3>Per component</h3>" + _table(
        ["component", "variant", "median ms", "p90 ms", "speedup", "peak RSS Δ", "size", "runs as / note"], comp_rows)
    html += _bar_chart(comp_bars, "ms")
    hw = bench.get("hardware") or {}
    html += f'<p class="note">Machine: {_e(hw.get("cpu", "?"))}, {_e(hw.get("cpu_count", "?"))} CPUs, ' \
            f'{_bytes(hw.get("memory_bytes"))} RAM, {_e(hw.get("system", ""))} {_e(hw.get("machine", ""))}' \
            f'{", GPU " + _e(hw["gpu"]["name"]) if hw.get("gpu") else ""}.</p>'
    return _card("Latency and memory", html)


def _sizes(manifest: dict[str, Any]) -> str:
    """Bytes per variant folder and component, from the manifest's file list."""
    sizes: dict[str, dict[str, int]] = {}
    for rel, entry in (manifest.get("files") or {}).items():
        parts = rel.split("/")
        if len(parts) < 3 or parts[0] in (REPORT_DIR, "reference", "calibration"):
            continue
        sizes.setdefault(parts[0], {}).setdefault(parts[1], 0)
        sizes[parts[0]][parts[1]] += int(entry.get("size", 0))
    if not sizes:
        return ""
    variants = sorted(sizes)
    components = sorted({c for v in sizes.values() for c in v if not c.startswith(("tokenizer", "scheduler"))})
    rows = [[f"<b>{_e(c)}</b>"] + [_bytes(sizes[v].get(c)) for v in variants] for c in components]
    rows.append(["<b>total</b>"] + [f"<b>{_bytes(sum(sizes[v].values()))}</b>" for v in variants])
    return _card("Artifact sizes", _table(["component"] + variants, rows))


def _variants(manifest: dict[str, Any]) -> str:
    """What each precision variant did per component: method, size against fp32, sparsity,
    fp32 islands kept, quantized ops and the distillation error (the targets' recorded details)."""
    rows = []
    for variant, target in sorted((manifest.get("targets") or {}).items()):
        for component, d in sorted((target.get("details") or {}).items()):
            if not isinstance(d, dict) or "method" not in d:
                continue
            ratio = d["bytes"] / d["fp32_bytes"] if d.get("bytes") and d.get("fp32_bytes") else None
            islands = d.get("islands") or {}
            kept = islands.get("kept_fp32")
            sparsity = (d.get("weights") or {}).get("sparsity")
            distill = d.get("distillation") or {}
            ops = ", ".join(f"{k} {v}" for k, v in sorted((d.get("ops") or {}).items()) if k != "Cast")
            before, after = d.get("parameters_before"), d.get("parameters_after")
            params = f"{after / 1e6:.1f} M of {before / 1e6:.1f} M" if before and after and after != before else "–"
            rows.append([_e(variant), f"<b>{_e(component)}</b>", _e(d["method"]), _bytes(d.get("bytes")),
                         _num(ratio, ".2f") + ("×" if ratio else ""), _num(sparsity, ".1%"), params,
                         "–" if kept is None else f'{len(kept)} <span class="why">{_e(", ".join(kept[:6]))}'
                         f'{" …" if len(kept) > 6 else ""}</span>',
                         _e(ops) or "–",
                         f'{_num(distill.get("error_before"))} → {_num(distill.get("error_after"))}' if distill else "–"])
    if not rows:
        return ""
    return _card("Precision variants", _table(["variant", "component", "method", "size", "vs fp32", "sparsity",
                                               "parameters", "fp32 islands kept", "quantized ops", "distillation error"], rows))


def _generations(out: Path, generations: dict[str, Any]) -> str:
    items = generations.get("generations") or []
    if not items:
        return ""
    figs = []
    for g in items:
        req = g.get("request") or {}
        caption = f'{_e(g.get("label"))}<br><q>{_e(req.get("prompt", ""))}</q><br>seed {_e(req.get("seed"))}, ' \
                  f'{_e(req.get("steps"))} steps, {_num(g.get("seconds"), ".2f")} s' \
                  f'{" (" + _e(_pipeline_runs_as(g["runner"])) + ")" if g.get("runner") else ""}'
        figs.append(f'<figure class="gen">{_img(out, g.get("report_image", ""), g.get("label", ""))}'
                    f'<figcaption>{caption}</figcaption></figure>')
    return _card("Generated images", f'<div class="gallery">{"".join(figs)}</div>')


def _manifest(manifest: dict[str, Any]) -> str:
    if not manifest:
        return ""
    versions = manifest.get("versions") or {}
    hw = manifest.get("hardware") or {}
    targets = manifest.get("targets") or {}
    rows = [["versions", _e(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))],
            ["hardware", _e(f'{hw.get("cpu", "?")} · {hw.get("cpu_count", "?")} CPUs · {hw.get("system", "")} '
                            f'{hw.get("machine", "")}')],
            ["targets built", _e(", ".join(f'{k} ({v.get("dir", "?")})' for k, v in sorted(targets.items())) or "–")],
            ["stages", _e(", ".join(sorted((manifest.get("stages") or {}).keys())) or "–")],
            ["files", _e(f'{len(manifest.get("files") or {})} files with sha256 in manifest.json')]]
    return _card("Manifest", _table(["", ""], rows, "kv"))


def _card(title: str, body: str) -> str:
    return f'<section class="card"><h2>{_e(title)}</h2>{body}</section>'


CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f6f9;color:#1f2933;font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1320px;margin:0 auto;padding:24px}
header{background:#102a43;color:#f0f4f8;border-radius:10px;padding:20px 24px;margin-bottom:20px}
header .title{display:flex;align-items:center;gap:16px}
h1{margin:0;font-size:24px;font-weight:600}
h2{margin:0 0 14px;font-size:18px;font-weight:600}
h3{margin:18px 0 8px;font-size:15px;font-weight:600;color:#334e68}
.facts{display:flex;flex-wrap:wrap;gap:28px;margin:14px 0 12px}
.facts span{display:block;font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:#9fb3c8}
.facts b{font-weight:500}
.chips{display:flex;flex-wrap:wrap;gap:6px}
.verdict{padding:3px 12px;border-radius:999px;font-weight:700;font-size:13px;letter-spacing:.04em}
.verdict.pass{background:#2f9e44;color:#fff}.verdict.fail{background:#e03131;color:#fff}
.verdict.muted{background:#627d98;color:#fff}.verdict.structural{background:#f08c00;color:#fff}
.card{background:#fff;border-radius:10px;padding:20px 24px;margin-bottom:20px;
box-shadow:0 1px 3px rgba(16,42,67,.08),0 1px 2px rgba(16,42,67,.06);overflow-x:auto}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap}
.badge.pass{background:#d3f9d8;color:#2b8a3e}.badge.fail{background:#ffe3e3;color:#c92a2a}
.badge.muted{background:#e4e7eb;color:#52606d}.badge.structural{background:#fff3bf;color:#e67700}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th{text-align:left;font-weight:600;color:#486581;border-bottom:2px solid #d9e2ec;padding:7px 10px;
font-size:12px;text-transform:uppercase;letter-spacing:.04em;white-space:nowrap}
td{border-bottom:1px solid #eef2f6;padding:7px 10px;vertical-align:top}
tbody tr:nth-child(even){background:#f8fafc}
table.kv td:first-child{width:140px;color:#486581;font-weight:600}
table.compact{margin-top:18px;font-size:13px}
.why{color:#c92a2a;font-size:12px;margin-top:2px}
.note{color:#52606d;margin:4px 0 10px}
code{background:#eef2f6;padding:1px 5px;border-radius:4px}
.grid{display:grid;gap:12px;align-items:start}
.cell.head{font-weight:600;color:#334e68;font-size:13px;padding-bottom:4px;border-bottom:2px solid #d9e2ec}
.cell.prompt q{display:block;font-style:italic;margin-bottom:4px}
.cell.prompt small{color:#627d98}
figure{margin:0}
figure img{width:100%;max-width:256px;image-rendering:pixelated;border-radius:6px;display:block;
box-shadow:0 0 0 1px #d9e2ec}
figcaption{font-size:12px;color:#486581;margin-top:6px;line-height:1.5}
.missing{padding:24px 10px;background:#fff5f5;color:#c92a2a;border-radius:6px;font-size:12px}
.gallery{display:flex;flex-wrap:wrap;gap:16px}
.gallery figure{width:200px}
svg.chart{max-width:900px;display:block;margin:6px 0 16px;font-size:12px;fill:#334e68}
footer{color:#829ab1;font-size:12px;text-align:center;padding:8px 0 24px}
"""


def render(out: Path, manifest: dict[str, Any] | None = None) -> str:
    """manifest: the data the command is about to write (default: manifest.json as it is)."""
    report_dir = out / REPORT_DIR
    manifest = manifest if manifest is not None else _load(out / "manifest.json")
    validation = _load(report_dir / "validation.json")
    bench = _load(report_dir / "bench.json")
    generations = _load(report_dir / "generations.json")
    body = "".join([
        _summary(manifest, validation),
        _images(out, validation),
        _components(validation),
        _bench(bench),
        _sizes(manifest),
        _variants(manifest),
        _generations(out, generations),
        _manifest(manifest),
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>diffprism report</title><style>{CSS}</style></head>'
            f'<body><main>{body}<footer>written by diffprism from the files in {_e(out.name)}/</footer></main>'
            f'</body></html>')


def write_report(out: Path, manifest: dict[str, Any] | None = None) -> Path:
    path = out / REPORT_DIR / REPORT_HTML
    write_bytes_atomic(path, render(out, manifest).encode("utf-8"))
    log.info("wrote %s", path)
    return path
