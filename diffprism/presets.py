"""Built-in pipelines: no network, nothing downloaded.

Most are built in-process with seeded random weights: tiny ones serve tests, full-size ones
(sd15-random, sdxl-random) serve benchmarks with the real architectures; the full-size DiTs
(flux-random, sd35-medium-random) are too large to hold and are materialised into a cache folder
once (diffprism.preset_cache), then streamed from it. tiny-shapes is
trained (diffprism/shapes) and shipped as safetensors, so its pictures mean something.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

import torch

from exporters.errors import SourceError

TOKENIZER_MAX_LENGTH = 77
T5_MAX_LENGTH = 512  # the T5 tokenizer's limit; each pipeline pads to its own max_sequence_length


def tokenizer():
    """CLIP BPE tokenizer over the small vocabulary shipped with the package."""
    from transformers import CLIPTokenizer

    root = resources.files("diffprism") / "assets" / "tokenizer"
    with resources.as_file(root / "vocab.json") as vocab, resources.as_file(root / "merges.txt") as merges:
        return CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=TOKENIZER_MAX_LENGTH)


def t5_tokenizer():
    """T5 unigram tokenizer over the small vocabulary shipped with the package (no sentencepiece model)."""
    import json

    from transformers import T5TokenizerFast

    data = json.loads((resources.files("diffprism") / "assets" / "t5_tokenizer" / "vocab.json").read_text("utf-8"))
    vocab = [(piece, float(score)) for piece, score in data["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(seed: int, **overrides):
    from transformers import T5Config, T5EncoderModel

    cfg = dict(
        vocab_size=len(t5_tokenizer()), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**cfg)).eval()


def _text_encoder(seed: int, with_projection: bool = False, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok_vocab = len(tokenizer())
    cfg = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, vocab_size=tok_vocab, projection_dim=32,
        bos_token_id=tok_vocab - 2, eos_token_id=tok_vocab - 1, pad_token_id=tok_vocab - 1, layer_norm_eps=1e-5,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**cfg)).eval()


def _vae(seed: int, **overrides):
    from diffusers import AutoencoderKL

    cfg = dict(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=64,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return AutoencoderKL(**cfg).eval()


def _unet(seed: int, **overrides):
    from diffusers import UNet2DConditionModel

    cfg = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).eval()


def _sd(unet, vae, text_encoder, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl(unet, vae, te1, te2, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer(), tokenizer_2=tokenizer(),
        unet=unet, scheduler=scheduler,
    )


def _ddim(**kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, **kw)


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _flow_match(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _flow_vae(seed: int, scaling_factor: float, shift_factor: float, **kw):
    # SD3 and Flux VAEs: 16 latent channels, no quant convs, a shift as well as a scale.
    return _vae(seed, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=scaling_factor, shift_factor=shift_factor, **kw)


def tiny_sd3(seed: int = 0):
    """SD3 style: CLIP-L/G with projection (penultimate hidden states), a T5 encoder, an MMDiT, a 16-channel VAE."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_flow_match(shift=3.0), vae=_flow_vae(seed + 1, 1.5305, 0.0609),
        text_encoder=_text_encoder(seed + 2, with_projection=True), tokenizer=tokenizer(),
        text_encoder_2=_text_encoder(seed + 3, with_projection=True), tokenizer_2=tokenizer(),
        text_encoder_3=_t5_encoder(seed + 4), tokenizer_3=t5_tokenizer(),
    )


def tiny_flux(seed: int = 0):
    """Flux.1-dev style: CLIP-L (pooled), T5 (sequence), a guidance-distilled transformer over packed 2x2 latents."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = _flow_match(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(seed + 1, 0.3611, 0.1159),
        text_encoder=_text_encoder(seed + 2), tokenizer=tokenizer(),
        text_encoder_2=_t5_encoder(seed + 3), tokenizer_2=t5_tokenizer(),
    )


def tiny_sd(seed: int = 0):
    return _sd(_unet(seed), _vae(seed + 1), _text_encoder(seed + 2), _ddim())


def tiny_sd2(seed: int = 0):
    # SD 2.x: v-prediction, linear projections in the transformer blocks, per-level head dims.
    unet = _unet(seed, use_linear_projection=True, attention_head_dim=(2, 4))
    return _sd(unet, _vae(seed + 1), _text_encoder(seed + 2, hidden_act="gelu"), _ddim(prediction_type="v_prediction"))


def tiny_sdxl(seed: int = 0):
    # SDXL: two text encoders (hidden 32 each -> cross attention 64), text_time added conditioning.
    unet = _unet(
        seed, use_linear_projection=True, attention_head_dim=(2, 4), addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )
    te1 = _text_encoder(seed + 2)
    te2 = _text_encoder(seed + 3, with_projection=True)
    return _sdxl(unet, _vae(seed + 1, force_upcast=True), te1, te2, _euler())


def tiny_lcm(seed: int = 0):
    """Latent Consistency Model style: an SD 1.x UNet taking the guidance scale as an embedding
    (timestep_cond, time_cond_proj_dim wide), an LCMScheduler, no classifier-free guidance."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=True, original_inference_steps=50)
    return LatentConsistencyModelPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(seed + 2), tokenizer=tokenizer(),
        unet=_unet(seed, time_cond_proj_dim=32), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _controlnet(unet, vae_scale: int, seed: int):
    """A ControlNet from the UNet's config (ControlNetModel.from_unet) with seeded random weights.

    Its conditioning embedding downsamples the control image to the latent size (one stride-2 conv per
    VAE halving). from_unet zero-initializes the output convolutions, so they get random weights too:
    a tiny preset's ControlNet must change the image, or no test could see the conditioning.
    """
    from diffusers import ControlNetModel

    halvings = vae_scale.bit_length() - 1
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(16 * 2**i for i in range(halvings + 1)),
                                    load_weights_from_unet=False).eval()
    with torch.no_grad():
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block):
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.zeros_(conv.bias)
        # A strong control embedding: with a weaker one a random ControlNet barely tells two edge maps apart.
        torch.nn.init.normal_(net.controlnet_cond_embedding.conv_out.weight, std=1.0)
        torch.nn.init.zeros_(net.controlnet_cond_embedding.conv_out.bias)
    return net


def tiny_sd_controlnet(seed: int = 0):
    """tiny-sd with a ControlNet built from its UNet's config (StableDiffusionControlNetPipeline)."""
    from diffusers import StableDiffusionControlNetPipeline

    base = tiny_sd(seed)
    return StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=_controlnet(base.unet, base.vae_scale_factor, seed + 5), scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_controlnet(seed: int = 0):
    """tiny-sdxl with a ControlNet built from its UNet's config (StableDiffusionXLControlNetPipeline)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    base = tiny_sdxl(seed)
    return StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=_controlnet(base.unet, base.vae_scale_factor, seed + 5),
        scheduler=base.scheduler, add_watermarker=False,
    )


def sd15_random(seed: int = 0):
    """SD 1.5 architecture (860M UNet, CLIP ViT-L text encoder, KL VAE) with random weights."""
    unet = _unet(
        seed, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return _sd(unet, _full_vae(seed + 1), _clip_l(seed + 2), _ddim())


def sdxl_random(seed: int = 0):
    """SDXL base architecture (2.6B UNet, CLIP-L + OpenCLIP bigG, KL VAE) with random weights."""
    unet = _unet(
        seed, block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    te2 = _text_encoder(
        seed + 3, with_projection=True, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
        num_hidden_layers=32, projection_dim=1280, hidden_act="gelu", vocab_size=49408,
    )
    return _sdxl(unet, _full_vae(seed + 1, force_upcast=True), _clip_l(seed + 2), te2, _euler())


def _full_vae(seed: int, **kw):
    return _vae(
        seed, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, **kw,
    )


def _clip_l(seed: int):
    return _text_encoder(
        seed, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        projection_dim=768, hidden_act="quick_gelu", vocab_size=49408,
    )


def _t5_xxl(seed: int):
    # T5 v1.1 XXL encoder as Flux and SD3 ship it (google/t5-v1_1-xxl, 4.7B parameters).
    return _t5_encoder(seed, vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       layer_norm_epsilon=1e-6)


def _clip_g(seed: int):
    # OpenCLIP bigG text tower with its projection (SDXL's and SD3's second encoder).
    return _text_encoder(seed, with_projection=True, hidden_size=1280, intermediate_size=5120,
                         num_attention_heads=20, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu",
                         vocab_size=49408)


def _full_flow_vae(seed: int, scaling_factor: float, shift_factor: float):
    return _flow_vae(seed, scaling_factor, shift_factor, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     sample_size=1024, force_upcast=True)


def flux_random(seed: int = 0):
    """Flux.1-dev architecture (12B transformer: 19 double + 38 single blocks, 24 x 128 heads; CLIP-L;
    T5-XXL; the 16-channel VAE) with random weights. Too large to hold: a materialised preset."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()
    scheduler = _flow_match(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_full_flow_vae(seed + 1, 0.3611, 0.1159),
        text_encoder=_clip_l(seed + 2), tokenizer=tokenizer(), text_encoder_2=_t5_xxl(seed + 3),
        tokenizer_2=t5_tokenizer(),
    )


def sd35_medium_random(seed: int = 0):
    """SD3.5-medium architecture (2.5B MMDiT with dual attention in blocks 0-12 and RMS qk-norm;
    CLIP-L, CLIP-G, T5-XXL; the 16-channel VAE) with random weights. A materialised preset."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ).eval()
    clip_l = _text_encoder(seed + 2, with_projection=True, hidden_size=768, intermediate_size=3072,
                           num_attention_heads=12, num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu",
                           vocab_size=49408)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_flow_match(shift=3.0), vae=_full_flow_vae(seed + 1, 1.5305, 0.0609),
        text_encoder=clip_l, tokenizer=tokenizer(), text_encoder_2=_clip_g(seed + 3), tokenizer_2=tokenizer(),
        text_encoder_3=_t5_xxl(seed + 4), tokenizer_3=t5_tokenizer(),
    )


SHAPES_DIR = "tiny-shapes"  # under diffprism/assets: a diffusers folder, retrained by diffprism.shapes.train


def tiny_shapes(seed: int = 0):
    """The SD 1.x-style pipeline trained on drawn shapes (32 px); its weights ship with the package,
    so the seed is unused."""
    from diffusers import StableDiffusionPipeline

    with resources.as_file(resources.files("diffprism") / "assets" / SHAPES_DIR) as path:
        if not (path / "model_index.json").is_file():
            raise SourceError(f"the tiny-shapes weights are missing from {path}",
                              "reinstall diffprism, or retrain them: python -m diffprism.shapes.train "
                              "--out diffprism/assets/tiny-shapes")
        return StableDiffusionPipeline.from_pretrained(
            path, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[..., Any]
    description: str
    tiny: bool
    # Too large to hold: built on the meta device, written once into a cache folder
    # (diffprism.preset_cache) and loaded from there with its weights streamed.
    materialised: bool = False


PRESETS = {
    p.name: p
    for p in (
        Preset("tiny-sd", tiny_sd, "SD 1.x style, tiny, random weights", True),
        Preset("tiny-sd2", tiny_sd2, "SD 2.x style (v-prediction, linear projection), tiny", True),
        Preset("tiny-sdxl", tiny_sdxl, "SDXL style (two text encoders, text_time), tiny", True),
        Preset("tiny-shapes", tiny_shapes, "SD 1.x style, tiny, trained to draw coloured shapes (32 px)", True),
        Preset("tiny-sd3", tiny_sd3, "SD3 style (CLIP-L/G + T5, MMDiT, 16-channel VAE), tiny", True),
        Preset("tiny-flux", tiny_flux, "Flux.1-dev style (CLIP-L + T5, packed latents, guidance embedding), tiny", True),
        Preset("tiny-lcm", tiny_lcm, "Latent Consistency Model style (timestep_cond guidance embedding), tiny", True),
        Preset("tiny-sd-controlnet", tiny_sd_controlnet, "tiny-sd with a ControlNet (random weights)", True),
        Preset("tiny-sdxl-controlnet", tiny_sdxl_controlnet, "tiny-sdxl with a ControlNet (random weights)", True),
        Preset("sd15-random", sd15_random, "SD 1.5 architecture, random weights (benchmarks)", False),
        Preset("sdxl-random", sdxl_random, "SDXL architecture, random weights (benchmarks)", False),
        Preset("flux-random", flux_random, "Flux.1-dev architecture, random bf16 weights, materialised (benchmarks)",
               False, materialised=True),
        Preset("sd35-medium-random", sd35_medium_random,
               "SD3.5-medium architecture, random bf16 weights, materialised (benchmarks)", False, materialised=True),
    )
}


def build(name: str, seed: int = 0):
    """The preset's pipeline; a materialised preset's models are on the meta device, their weights
    in its cache folder (`folder(name, seed)`)."""
    if name not in PRESETS:
        raise SourceError(f"unknown preset '{name}'", f"choose from {', '.join(PRESETS)}")
    if PRESETS[name].materialised:
        from exporters.streaming import empty_pipeline

        return empty_pipeline(folder(name, seed))
    return PRESETS[name].build(seed)


def folder(name: str, seed: int = 0):
    """The cache folder of a materialised preset, written on first use."""
    from diffprism import preset_cache

    return preset_cache.materialised(name, PRESETS[name].build, seed)
