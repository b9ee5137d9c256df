"""Retrain the tiny-shapes weights shipped in diffprism/assets/tiny-shapes.

    python -m diffprism.shapes.train --out diffprism/assets/tiny-shapes --log train.log

One thread, seeded, three stages on data drawn by scenes.py (held-out combinations are
never seen): the VAE as an autoencoder; the text encoder as a caption classifier (every
position from the end-of-text token on predicts shape, colours and position, so the
UNet's cross-attention finds them everywhere); then the UNet on precomputed latents and
the frozen encoder's embeddings, with 10% empty captions for classifier-free guidance,
min-SNR loss weights and an EMA of the weights. Finally it measures the prompt match of
held-out prompts and writes the diffusers folder (safetensors) via a temporary folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffprism.shapes import check, scenes

log = logging.getLogger(__name__)

IMAGE = 32  # pixels; the VAE downsamples 4x to an 8x8 latent
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
VAE = dict(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
           sample_size=IMAGE)
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=IMAGE // 4, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT["hidden_size"], attention_head_dim=8, norm_num_groups=16)


def _text_encoder(seed: int):
    from diffprism import presets

    return presets._text_encoder(seed, **TEXT)


def _images(n: int, seed: int) -> tuple[torch.Tensor, list[scenes.Scene]]:
    train, _ = scenes.split()
    x, picked = scenes.dataset(train, n, seed=seed, size=IMAGE)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0), picked


def train_vae(steps: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    data, _ = _images(4096, seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (16,), generator=g)]
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=g)).sample
        rec = F.mse_loss(y, x) + 0.1 * F.l1_loss(y, x)
        loss = rec + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("vae %d/%d rec %.5f kl %.1f (%.0fs)", step, steps, rec.item(), post.kl().mean().item(), time.time() - t0)
    return vae.eval()


def train_text_encoder(steps: int, seed: int):
    from diffprism import presets

    te = _text_encoder(seed)
    tok = presets.tokenizer()
    train, _ = scenes.split()
    ids = tok([s.caption for s in train], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    eos = (ids == tok.eos_token_id).int().argmax(1)
    after_eos = torch.arange(ids.shape[1])[None] >= eos[:, None]  # positions that have seen the whole caption
    labels = {a: torch.tensor([vocab.index(getattr(s, a)) for s in train]) for a, vocab in _VOCABS.items()}
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(TEXT["hidden_size"], len(v)) for a, v in _VOCABS.items()})
    opt = torch.optim.AdamW(list(te.parameters()) + list(heads.parameters()), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    te.train()
    for step in range(steps):
        b = torch.randint(0, len(train), (64,), generator=g)
        h = te(ids[b]).last_hidden_state
        mask = after_eos[b]
        loss, acc = 0.0, []
        for a, head in heads.items():
            logits = head(h[mask])
            target = labels[a][b][:, None].expand(-1, ids.shape[1])[mask]
            loss = loss + F.cross_entropy(logits, target)
            acc.append((logits.argmax(-1) == target).float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("text_encoder %d/%d loss %.4f acc %s", step, steps, loss.item(), [round(x, 3) for x in acc])
    return te.eval()


_VOCABS = {"shape": list(scenes.SHAPES), "colour": list(scenes.COLOURS), "background": list(scenes.COLOURS),
           "position": list(scenes.POSITIONS)}


def _noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@torch.no_grad()
def _encode(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in x.split(256):
        d = vae.encode(chunk).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(vae, te, steps: int, seed: int, n_images: int, batch: int, checkpoint=None, every: int = 0):
    from diffusers import UNet2DConditionModel
    from diffprism import presets

    tok = presets.tokenizer()
    train, _ = scenes.split()
    captions = [s.caption for s in train] + [""]
    with torch.no_grad():
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        emb = te(ids).last_hidden_state
    index = {c: i for i, c in enumerate(captions)}
    x, picked = _images(n_images, seed + 1)
    mean, std = _encode(vae, x)
    scale = 1.0 / float((mean + std * torch.randn(std.shape, generator=torch.Generator().manual_seed(seed))).std())
    vae.register_to_config(scaling_factor=scale)
    log.info("latents %s, scaling_factor %.4f", tuple(mean.shape), scale)
    cap = torch.tensor([index[s.caption] for s in picked])

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_sched = _noise_scheduler()
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    # Constant rate after a warm-up, so the weights after N steps do not depend on the total asked for.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(seed)
    t0, running = time.time(), 0.0
    for step in range(steps):
        b = torch.randint(0, len(mean), (batch,), generator=g)
        z = (mean[b] + std[b] * torch.randn(mean[b].shape, generator=g)) * scale
        c = cap[b].clone()
        c[torch.rand(batch, generator=g) < 0.1] = len(captions) - 1  # empty caption: unconditional
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        pred = unet(noise_sched.add_noise(z, noise, t), t, emb[c]).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weights for epsilon prediction
        loss = (w * ((pred - noise) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("unet %d/%d loss %.4f (%.0fs)", step, steps, running, time.time() - t0)
        if checkpoint and every and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(ema, step + 1)
    return ema


def assemble(vae, te, unet):
    from diffprism import presets

    return presets._sd(unet, vae, te, presets._ddim())


def save(pipe, out: Path, info: dict) -> dict:
    """Measures held-out prompt match, then writes the folder through a temporary sibling."""
    pipe.set_progress_bar_config(disable=True)
    _, held_out = scenes.split()
    matches, _ = check.generate_matches(pipe, [s.caption for s in held_out], steps=20)
    info = {**info, "held_out_match": check.rates(matches)}
    log.info("%s: held-out prompt match %s", out, info["held_out_match"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="diffusers folder to write (replaced)")
    ap.add_argument("--log", type=Path, help="also log progress to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--text-steps", type=int, default=300)
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="also write <out>.step<N> every N UNet steps (the same weights a run of N steps writes)")
    args = ap.parse_args(argv)
    handlers = [logging.StreamHandler()] + ([logging.FileHandler(args.log)] if args.log else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers)
    torch.set_num_threads(1)
    start = time.time()
    vae = train_vae(args.vae_steps, args.seed)
    te = train_text_encoder(args.text_steps, args.seed)
    base = {"args": {k: str(v) for k, v in vars(args).items() if k not in ("out", "log", "checkpoint_every")}}

    def checkpoint(unet, step):
        save(assemble(vae, te, copy.deepcopy(unet)), args.out.with_name(f"{args.out.name}.step{step}"),
             {**base, "unet_steps": step, "seconds": round(time.time() - start)})

    unet = train_unet(vae, te, args.unet_steps, args.seed, args.images, args.unet_batch, checkpoint,
                      args.checkpoint_every)
    save(assemble(vae, te, unet), args.out, {**base, "unet_steps": args.unet_steps, "seconds": round(time.time() - start)})
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
