// The page: a form, a canvas, a timings table, and window.diffprism, a small API for scripts and tests:
//   await diffprism.ready; const r = await diffprism.generate({prompt, steps, guidanceScale, seed, latents});
// Query string: ?prompt=...&negative=...&steps=4&guidance=7.5&seed=0&backend=auto|webgpu|wasm&threads=N
//   &latents=<url of raw little-endian float32 initial latents>&run=1
import { createPipeline, drawImage } from "./pipeline.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const status = (text) => { $("status").textContent = text; };

function showTimings(result, load) {
  const rows = [...Object.entries(load), ["text_encoder", result.timings.text_encoder],
    ...result.timings.steps.map((ms, i) => [`unet step ${i + 1}`, ms]), ["vae_decoder", result.timings.vae_decoder],
    ["total", result.timings.total]];
  $("timings").innerHTML = rows.map(([k, ms]) => `<tr><td>${k}</td><td>${ms.toFixed(1)} ms</td></tr>`).join("");
}

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function fromBase64(text) {
  return new Float32Array(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)).buffer);
}

async function start() {
  for (const [key, id] of [["prompt", "prompt"], ["negative", "negative"], ["steps", "steps"], ["guidance", "guidance"],
    ["seed", "seed"]]) {
    if (params.has(key)) $(id).value = params.get(key);
  }
  status("loading models");
  const pipe = await createPipeline(new URL(".", location.href), {
    backend: params.get("backend") || "auto", threads: Number(params.get("threads") || 0) });
  $("backend").textContent = `${pipe.info.backend}, ${pipe.info.threads} WASM thread(s) (WebGPU: ${pipe.info.webgpu})`;
  status("ready");
  const api = {
    info: { ...pipe.info, bundle: pipe.bundle },
    async generate(opts) {
      status("generating");
      for (const [key, id] of [["prompt", "prompt"], ["negativePrompt", "negative"], ["steps", "steps"],
        ["guidanceScale", "guidance"], ["seed", "seed"]]) {
        if (opts[key] !== undefined) $(id).value = opts[key];  // the form shows what ran
      }
      const latents = typeof opts.latents === "string" ? fromBase64(opts.latents) : opts.latents;
      const result = await pipe.generate({ ...opts, latents });
      drawImage($("canvas"), result);
      showTimings(result, pipe.info.loadTimings);
      status(`done in ${result.timings.total.toFixed(0)} ms on ${result.backend}`);
      return result;
    },
    // What a test reads back: the canvas pixels (RGBA) and the final latents, base64.
    async generateForCheck(opts) {
      const r = await api.generate(opts);
      const canvas = $("canvas");
      const rgba = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      return { rgba: toBase64(new Uint8Array(rgba.buffer)), latents: toBase64(new Uint8Array(r.latents.buffer)),
        height: r.height, width: r.width, timings: r.timings, backend: r.backend, webgpu: pipe.info.webgpu,
        load: pipe.info.loadTimings };
    },
  };
  return api;
}

async function formOptions() {
  const opts = { prompt: $("prompt").value, negativePrompt: $("negative").value, steps: Number($("steps").value),
    guidanceScale: Number($("guidance").value), seed: Number($("seed").value) };
  if (params.has("latents")) {
    const res = await fetch(params.get("latents"));
    if (!res.ok) throw new Error(`latents ${params.get("latents")}: HTTP ${res.status}`);
    opts.latents = new Float32Array(await res.arrayBuffer());
  }
  return opts;
}

window.diffprism = { ready: start() };
window.diffprism.ready.then((api) => {
  Object.assign(window.diffprism, api);
  $("go").disabled = false;
  $("go").onclick = async () => {
    try { await api.generate(await formOptions()); } catch (err) { status(`error: ${err.message}`); }
  };
  if (params.get("run") === "1") $("go").click();
}, (err) => status(`error: ${err.message}`));
