// Text to image on ONNX Runtime Web: tokenize, text encoder, denoising loop with classifier-free
// guidance, VAE decoder. Everything it needs to know about the export is in bundle.json.
import * as ort from "./ort/ort.webgpu.min.mjs";
import { ClipTokenizer } from "./tokenizer.mjs";
import { makeScheduler } from "./scheduler.mjs";

const now = () => performance.now();

async function fetchJson(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.json();
}

// "webgpu" (with WASM for what WebGPU cannot run), "wasm", or "auto": WebGPU when the browser has an adapter.
export async function probeWebGpu() {
  if (!("gpu" in navigator)) return "navigator.gpu is missing";
  try {
    const adapter = await navigator.gpu.requestAdapter();
    return adapter ? "available" : "requestAdapter() returned no adapter";
  } catch (err) {
    return `requestAdapter() failed: ${err}`;
  }
}

// threads: WASM threads (they need a cross-origin isolated page); default up to 4.
export async function createPipeline(base, { backend = "auto", threads = 0 } = {}) {
  const bundle = await fetchJson(new URL("bundle.json", base));
  const webgpu = await probeWebGpu();
  let chosen = backend === "auto" ? (webgpu === "available" ? "webgpu" : "wasm") : backend;
  if (chosen === "webgpu" && webgpu !== "available") throw new Error(`WebGPU is not available here: ${webgpu}`);
  if (!["webgpu", "wasm"].includes(chosen)) throw new Error(`unknown backend '${backend}' (webgpu, wasm, auto)`);
  ort.env.wasm.wasmPaths = new URL("ort/", base).href;
  ort.env.wasm.numThreads = !self.crossOriginIsolated ? 1 : threads || Math.min(4, navigator.hardwareConcurrency || 1);
  const providers = chosen === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
  const timings = {};
  const sessions = {};
  for (const [name, c] of Object.entries(bundle.components)) {
    const start = now();
    const dir = new URL(`${name}/`, base);
    const externalData = c.external_data.map((path) => ({ path, data: new URL(path, dir).href }));
    sessions[name] = await ort.InferenceSession.create(new URL(c.model, dir).href, {
      executionProviders: providers, externalData, graphOptimizationLevel: "all",
    });
    timings[`load ${name}`] = now() - start;
  }
  const tokenizer = new ClipTokenizer(await fetchJson(new URL("tokenizer/tokenizer.json", base)),
    await fetchJson(new URL("tokenizer/tokenizer_config.json", base)));
  const scheduler = await fetchJson(new URL("scheduler/scheduler_config.json", base));
  return new Pipeline(bundle, sessions, tokenizer, scheduler, { backend: chosen, providers, webgpu, threads: ort.env.wasm.numThreads, loadTimings: timings });
}

class Pipeline {
  constructor(bundle, sessions, tokenizer, scheduler, info) {
    Object.assign(this, { bundle, sessions, tokenizer, schedulerConfig: scheduler, info });
  }

  async encode(text) {
    const g = this.bundle.geometry;
    const ids = this.tokenizer.encode(text, g.max_sequence);
    const feed = { input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]) };
    const out = await this.sessions.text_encoder.run(feed);
    return out.last_hidden_state;
  }

  // opts: prompt, negativePrompt, steps, guidanceScale, height, width, seed, latents (Float32Array, unscaled noise).
  async generate(opts) {
    const g = this.bundle.geometry;
    const height = opts.height || g.default_height, width = opts.width || g.default_width;
    if (height % g.latent_multiple || width % g.latent_multiple) {
      throw new Error(`image size ${height}x${width} is not a multiple of ${g.latent_multiple}`);
    }
    const steps = opts.steps || 20, guidance = opts.guidanceScale ?? 7.5;
    const cfg = guidance > 1;
    const lh = height / g.vae_scale, lw = width / g.vae_scale, size = g.latent_channels * lh * lw;
    const timings = { steps: [] };
    const t0 = now();

    let start = now();
    const cond = await this.encode(opts.prompt || "");
    const uncond = cfg ? await this.encode(opts.negativePrompt || "") : null;
    timings.text_encoder = now() - start;
    const [, seq, hidden] = cond.dims;
    const embeds = cfg ? concat([uncond.data, cond.data]) : cond.data;

    let latents = opts.latents ? Float32Array.from(opts.latents) : seededNoise(opts.seed ?? 0, size);
    if (latents.length !== size) throw new Error(`latents have ${latents.length} values, expected ${size}`);
    const scheduler = makeScheduler(this.schedulerConfig, steps);
    latents = latents.map((x) => x * scheduler.initNoiseSigma);
    const batch = cfg ? 2 : 1;
    const text = new ort.Tensor("float32", embeds, [batch, seq, hidden]);
    for (let i = 0; i < scheduler.timesteps.length; i++) {
      start = now();
      const t = scheduler.timesteps[i];
      const input = scheduler.scaleModelInput(latents, i);
      const feed = {
        sample: new ort.Tensor("float32", cfg ? concat([input, input]) : input, [batch, g.latent_channels, lh, lw]),
        timestep: new ort.Tensor("float32", new Float32Array(batch).fill(t), [batch]),
        encoder_hidden_states: text,
      };
      const noise = (await this.sessions.unet.run(feed)).out_sample.data;
      let guided = noise;
      if (cfg) {
        guided = new Float32Array(size);
        for (let k = 0; k < size; k++) guided[k] = noise[k] + guidance * (noise[size + k] - noise[k]);
      }
      latents = scheduler.step(guided, i, latents);
      timings.steps.push(now() - start);
    }

    start = now();
    const z = latents.map((x) => x / g.scaling_factor + (g.shift_factor || 0));
    const decoded = await this.sessions.vae_decoder.run({
      latent_sample: new ort.Tensor("float32", z, [1, g.latent_channels, lh, lw]),
    });
    timings.vae_decoder = now() - start;
    const image = toImage(decoded.sample.data, height, width);
    timings.total = now() - t0;
    return { latents, image, height, width, timings, backend: this.info.backend };
  }
}

function concat(parts) {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

// NCHW in [-1, 1] -> HWC float in [0, 1], as diffusers' image processor does.
function toImage(chw, height, width) {
  const plane = height * width, out = new Float32Array(plane * 3);
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < plane; p++) out[p * 3 + c] = Math.min(1, Math.max(0, chw[c * plane + p] / 2 + 0.5));
  }
  return out;
}

// Standard normal noise from a seed (mulberry32 + Box-Muller). Not torch's generator: to reproduce a
// PyTorch image exactly, pass the same initial latents instead.
export function seededNoise(seed, n) {
  let s = seed >>> 0;
  const uniform = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform())), a = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(a);
    if (i + 1 < n) out[i + 1] = r * Math.sin(a);
  }
  return out;
}

export function drawImage(canvas, result) {
  canvas.width = result.width;
  canvas.height = result.height;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(result.width, result.height);
  for (let p = 0; p < result.width * result.height; p++) {
    for (let c = 0; c < 3; c++) pixels.data[p * 4 + c] = Math.round(result.image[p * 3 + c] * 255);
    pixels.data[p * 4 + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
}
