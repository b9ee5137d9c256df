// The pipeline's scheduler in JS, with diffusers' timesteps and sigmas (DDIMScheduler and
// EulerDiscreteScheduler, eta 0 / no churn). Schedules are rounded to float32 as torch keeps them.
const f32 = Math.fround;

function alphasCumprod(cfg) {
  if (cfg.trained_betas) throw new Error("trained_betas are not supported in the browser scheduler");
  if (cfg.rescale_betas_zero_snr) throw new Error("rescale_betas_zero_snr is not supported in the browser scheduler");
  const n = cfg.num_train_timesteps;
  const betas = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const frac = n === 1 ? 0 : i / (n - 1);
    if (cfg.beta_schedule === "linear") betas[i] = cfg.beta_start + frac * (cfg.beta_end - cfg.beta_start);
    else if (cfg.beta_schedule === "scaled_linear") {
      const a = f32(Math.sqrt(cfg.beta_start)), b = f32(Math.sqrt(cfg.beta_end));
      const root = f32(a + frac * (b - a));
      betas[i] = root * root;
    } else throw new Error(`beta_schedule '${cfg.beta_schedule}' is not supported in the browser scheduler`);
  }
  const acp = new Float32Array(n);
  let prod = 1;
  for (let i = 0; i < n; i++) { prod = f32(prod * f32(1 - betas[i])); acp[i] = prod; }
  return acp;
}

// Float timesteps as numpy computes them; "linspace" ones are not rounded here.
function spacedTimesteps(cfg, steps) {
  const n = cfg.num_train_timesteps;
  if (steps > n) throw new Error(`${steps} steps exceed the scheduler's ${n} training timesteps`);
  const out = [];
  if (cfg.timestep_spacing === "leading") {
    const ratio = Math.floor(n / steps);
    for (let i = steps - 1; i >= 0; i--) out.push(Math.round(i * ratio) + cfg.steps_offset);
  } else if (cfg.timestep_spacing === "trailing") {
    const ratio = n / steps;
    for (let i = 0; n - i * ratio > 0; i++) out.push(roundEven(n - i * ratio) - 1);
  } else if (cfg.timestep_spacing === "linspace") {
    for (let i = steps - 1; i >= 0; i--) {
      out.push(steps === 1 ? 0 : (i * (n - 1)) / (steps - 1));
    }
  } else throw new Error(`timestep_spacing '${cfg.timestep_spacing}' is not supported in the browser scheduler`);
  return out;
}

function roundEven(x) {  // numpy's round: half to even
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

class Ddim {
  constructor(cfg, steps) {
    if (cfg.thresholding) throw new Error("DDIM thresholding is not supported in the browser scheduler");
    this.cfg = cfg;
    this.acp = alphasCumprod(cfg);
    this.finalAlpha = cfg.set_alpha_to_one ? 1 : this.acp[0];
    this.steps = steps;
    const ts = spacedTimesteps(cfg, steps);
    this.timesteps = cfg.timestep_spacing === "linspace" ? ts.map(roundEven) : ts;
    this.initNoiseSigma = 1;
  }
  scaleModelInput(sample) { return sample; }
  step(output, i, sample) {
    const t = this.timesteps[i];
    const prev = t - Math.floor(this.cfg.num_train_timesteps / this.steps);
    const a = this.acp[t], aPrev = prev >= 0 ? this.acp[prev] : this.finalAlpha;
    const b = 1 - a, sa = Math.sqrt(a), sb = Math.sqrt(b);
    const range = this.cfg.clip_sample_range, type = this.cfg.prediction_type;
    const out = new Float32Array(sample.length);
    const sPrev = Math.sqrt(aPrev), sDir = Math.sqrt(1 - aPrev);
    for (let k = 0; k < sample.length; k++) {
      const x = sample[k], m = output[k];
      let x0, eps;
      if (type === "epsilon") { x0 = (x - sb * m) / sa; eps = m; }
      else if (type === "v_prediction") { x0 = sa * x - sb * m; eps = sa * m + sb * x; }
      else if (type === "sample") { x0 = m; eps = (x - sa * x0) / sb; }
      else throw new Error(`prediction_type '${type}' is not supported`);
      if (this.cfg.clip_sample) x0 = Math.min(range, Math.max(-range, x0));  // eps stays the model's
      out[k] = sPrev * x0 + sDir * eps;
    }
    return out;
  }
}

class Euler {
  constructor(cfg, steps) {
    for (const key of ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]) {
      if (cfg[key]) throw new Error(`${key} is not supported in the browser scheduler`);
    }
    if ((cfg.interpolation_type || "linear") !== "linear") throw new Error("only linear sigma interpolation is supported");
    if ((cfg.timestep_type || "discrete") !== "discrete") throw new Error("only discrete timesteps are supported");
    this.cfg = cfg;
    const acp = alphasCumprod(cfg);
    const table = Array.from(acp, (a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
    this.timesteps = spacedTimesteps(cfg, steps).map(f32);
    this.sigmas = this.timesteps.map((t) => {  // np.interp over the training timesteps
      const lo = Math.floor(t), hi = Math.min(lo + 1, table.length - 1), w = t - lo;
      return f32(table[lo] + w * (table[hi] - table[lo]));
    });
    const last = (cfg.final_sigmas_type || "zero") === "zero" ? 0 : f32(Math.sqrt((1 - acp[0]) / acp[0]));
    this.sigmas.push(last);
    const max = Math.max(...this.sigmas);
    this.initNoiseSigma = ["linspace", "trailing"].includes(cfg.timestep_spacing) ? max : Math.sqrt(max * max + 1);
  }
  scaleModelInput(sample, i) {
    const s = this.sigmas[i], scale = Math.sqrt(s * s + 1);
    return sample.map((x) => x / scale);
  }
  step(output, i, sample) {
    const s = this.sigmas[i], dt = this.sigmas[i + 1] - s, type = this.cfg.prediction_type;
    const out = new Float32Array(sample.length);
    for (let k = 0; k < sample.length; k++) {
      const x = sample[k], m = output[k];
      let x0;
      if (type === "epsilon") x0 = x - s * m;
      else if (type === "v_prediction") x0 = m * (-s / Math.sqrt(s * s + 1)) + x / (s * s + 1);
      else throw new Error(`prediction_type '${type}' is not supported`);
      out[k] = x + ((x - x0) / s) * dt;
    }
    return out;
  }
}

export const SCHEDULERS = { DDIMScheduler: Ddim, EulerDiscreteScheduler: Euler };

export function makeScheduler(config, steps) {
  const cls = SCHEDULERS[config._class_name];
  if (!cls) throw new Error(`scheduler ${config._class_name} has no browser implementation (have ${Object.keys(SCHEDULERS)})`);
  return new cls({ steps_offset: 0, timestep_spacing: "leading", prediction_type: "epsilon", clip_sample_range: 1, ...config }, steps);
}
