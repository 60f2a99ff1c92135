"""Tiny offline builders for image/video-conditioned diffusers pipelines:
FluxKontext, QwenImageEdit, Wan 2.2 TI2V (expand_timesteps, t2v and i2v), Wan 2.1 I2V (CLIP vision), FluxFill.

Random weights, 2-layer transformers (Flux: 1 double + 1 single block), hidden <= 64, offline tokenizers from
tests/pipelines.py. Each builder is deterministic given its seed. Conditioning images are deterministic tensors/PIL.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
import pipelines as P  # noqa: E402

TEXT_LEN = P.TEXT_LEN
PROMPTS = list(P.PROMPTS)
NEGATIVE = list(P.NEGATIVE)


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _flux_parts(in_channels=16, out_channels=None):
    from diffusers import FluxTransformer2DModel
    tokenizer, tokenizer_2 = P.clip_tokenizer(), P.t5_tokenizer()
    text_encoder = P._clip_text(tokenizer)
    text_encoder_2 = P._t5_encoder(tokenizer_2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True).eval()
    vae = P._vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                 use_post_quant_conv=False)
    return dict(scheduler=_flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


# -- 1. FluxKontext ----------------------------------------------------------------------------
@P._seeded
def flux_kontext():
    from diffusers import FluxKontextPipeline
    return FluxKontextPipeline(**_flux_parts(), image_encoder=None, feature_extractor=None)


# -- 4. FluxFill -------------------------------------------------------------------------------
@P._seeded
def flux_fill():
    from diffusers import FluxFillPipeline
    # packed channels: latents 4*4 + masked-image latents 4*4 + mask (vae_scale_factor**2 = 4) * 4 = 48
    return FluxFillPipeline(**_flux_parts(in_channels=48, out_channels=16))


# -- 2. QwenImageEdit (text encoder bypassed with prompt_embeds) -------------------------------
QWEN_EDIT_AREA = [32 * 32]  # the pipeline resizes the condition image to ~1024**2 px; patched to this area


@contextlib.contextmanager
def qwen_edit_area(area):
    old = QWEN_EDIT_AREA[0]
    QWEN_EDIT_AREA[0] = area
    try:
        yield
    finally:
        QWEN_EDIT_AREA[0] = old


def _patch_qwen_edit_dimensions():
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as m
    if getattr(m.calculate_dimensions, "_probe_patched", False):
        return
    orig = m.calculate_dimensions

    def calculate_dimensions(target_area, ratio):
        return orig(QWEN_EDIT_AREA[0], ratio)
    calculate_dimensions._probe_patched = True
    m.calculate_dimensions = calculate_dimensions


@P._seeded
def qwen_edit():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageTransformer2DModel)
    _patch_qwen_edit_dimensions()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=transformer)


def qwen_embeds(lengths, seed, seq=None, dim=32):
    """Padded prompt embeddings + mask as Qwen2.5-VL would give (per-prompt valid lengths)."""
    g = torch.Generator().manual_seed(seed)
    seq = seq or max(lengths)
    e = torch.randn(len(lengths), seq, dim, generator=g)
    m = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
        e[i, n:] = 0
    return e, m


# -- 3. Wan ------------------------------------------------------------------------------------
def _wan_common():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    tokenizer = P.t5_tokenizer()
    text_encoder = P._t5_encoder(tokenizer, d_model=32, umt5=True)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                           scale_factor_temporal=2, scale_factor_spatial=4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)


def _wan_transformer(in_channels=4, image_dim=None):
    from diffusers import WanTransformer3DModel
    extra = dict(image_dim=image_dim, added_kv_proj_dim=24) if image_dim else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra).eval()


@P._seeded
def wan22_ti2v_t2v():
    """WanPipeline with expand_timesteps=True (Wan 2.2 TI2V-5B text-to-video): per-token timesteps (B, seq)."""
    from diffusers import WanPipeline
    return WanPipeline(**_wan_common(), transformer=_wan_transformer(), expand_timesteps=True)


@P._seeded
def wan22_ti2v_i2v():
    """WanImageToVideoPipeline with expand_timesteps=True (Wan 2.2 TI2V-5B image-to-video): the first latent
    frame is the encoded image (mask 0, timestep 0 on its tokens), no CLIP image encoder."""
    from diffusers import WanImageToVideoPipeline
    return WanImageToVideoPipeline(**_wan_common(), transformer=_wan_transformer(), image_encoder=None,
                                   image_processor=None, expand_timesteps=True)


@P._seeded
def wan21_i2v():
    """WanImageToVideoPipeline (Wan 2.1 I2V): CLIP vision image embeddings (added K/V cross-attention) and
    [mask, condition latent] concatenated on channels (4 + 2 + 4 = 10 in)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    enc = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8,
                                           projection_dim=32)).eval()
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(**_wan_common(), transformer=_wan_transformer(in_channels=10, image_dim=32),
                                   image_encoder=enc, image_processor=proc)


@P._seeded
def wan22_i2v_a14b():
    """WanImageToVideoPipeline for Wan 2.2 I2V-A14B: two experts (boundary_ratio=0.9), no CLIP image encoder,
    [mask, condition latent] concatenated on channels (in 10)."""
    from diffusers import WanImageToVideoPipeline
    return WanImageToVideoPipeline(**_wan_common(), transformer=_wan_transformer(in_channels=10),
                                   transformer_2=_wan_transformer(in_channels=10), boundary_ratio=0.9,
                                   image_encoder=None, image_processor=None)


@P._seeded
def qwen_edit_plus():
    """QwenImageEditPlusPipeline (several condition images, each image's latents appended to the sequence);
    module constants VAE_IMAGE_SIZE / CONDITION_IMAGE_SIZE (1024**2, 384**2 px) patched to 32*32."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as m
    from diffusers import QwenImageEditPlusPipeline
    m.VAE_IMAGE_SIZE = 32 * 32
    m.CONDITION_IMAGE_SIZE = 32 * 32
    base = qwen_edit.__wrapped__()
    return QwenImageEditPlusPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                     processor=None, transformer=base.transformer)


BUILDERS = {"flux_kontext": flux_kontext, "qwen_edit": qwen_edit, "qwen_edit_plus": qwen_edit_plus, "wan22_ti2v_t2v": wan22_ti2v_t2v,
            "wan22_ti2v_i2v": wan22_ti2v_i2v, "wan21_i2v": wan21_i2v, "wan22_i2v_a14b": wan22_i2v_a14b,
            "flux_fill": flux_fill}


# -- inputs --------------------------------------------------------------------------------------
def cond_image(size=16, seed=0, pil=False, w=None):
    w = w or size
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, size, w, generator=g)
    if pil:
        from PIL import Image
        return Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return img


def fill_mask(size=16):
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return m


def defaults(name: str) -> dict:
    if name == "flux_kontext":
        return dict(prompt=list(PROMPTS), image=cond_image(16), height=16, width=16, max_area=16 * 16,
                    _auto_resize=False, guidance_scale=2.5, max_sequence_length=TEXT_LEN)
    if name == "flux_fill":
        return dict(prompt=list(PROMPTS), image=cond_image(16), mask_image=fill_mask(16), height=16, width=16,
                    guidance_scale=30.0, max_sequence_length=TEXT_LEN)
    if name == "qwen_edit_plus":  # the pipeline only supports batch_size=1
        e, m = qwen_embeds([10], seed=1)
        return dict(prompt=None, prompt_embeds=e, prompt_embeds_mask=m, height=16, width=16, true_cfg_scale=1.0,
                    image=[cond_image(16, pil=True), cond_image(16, seed=1, pil=True)])
    if name == "qwen_edit":
        e, m = qwen_embeds([10, 7], seed=1)
        return dict(prompt=None, prompt_embeds=e, prompt_embeds_mask=m, image=cond_image(16, pil=True),
                    height=16, width=16, true_cfg_scale=1.0)
    if name.startswith("wan"):
        kw = dict(prompt=list(PROMPTS), height=16, width=16, num_frames=9, guidance_scale=1.0,
                  max_sequence_length=TEXT_LEN)
        if "_i2v" in name:
            kw["image"] = cond_image(16, pil=True)
        return kw
    raise KeyError(name)


def two_calls(name: str) -> dict:
    if name in ("flux_kontext", "flux_fill"):
        return dict(true_cfg_scale=2.0, negative_prompt=NEGATIVE) if name == "flux_kontext" else {}
    if name in ("qwen_edit", "qwen_edit_plus"):
        ne, nm = qwen_embeds([5, 5] if name == "qwen_edit" else [5], seed=2)  # uncond: its own (shorter, unmasked) length, as real prompts give
        return dict(true_cfg_scale=4.0, negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm)
    if name == "wan22_i2v_a14b":
        return dict(guidance_scale=3.5, guidance_scale_2=2.0, negative_prompt=NEGATIVE)
    if name.startswith("wan"):
        return dict(guidance_scale=5.0, negative_prompt=NEGATIVE)
    return {}


def wan_embeds(pipe, prompts):
    """WanImageToVideoPipeline's prompt cleaning needs ftfy (not installed): encode with WanPipeline's
    identical T5 path (whose cleaning skips ftfy when it is missing) on this pipeline's own encoder."""
    from diffusers import WanPipeline
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(pipe, prompt=prompts, max_sequence_length=TEXT_LEN,
                                                 device=torch.device("cpu"))


def pipe_kwargs(name, pipe, **overrides):
    kw = defaults(name)
    kw.update(overrides)
    if name in ("wan22_ti2v_i2v", "wan21_i2v", "wan22_i2v_a14b"):
        if kw.get("prompt") is not None:
            kw["prompt_embeds"] = wan_embeds(pipe, kw.pop("prompt"))
            kw["prompt"] = None
        if kw.get("guidance_scale", 1.0) > 1.0:
            neg = kw.pop("negative_prompt", None) or [""] * kw["prompt_embeds"].shape[0]
            kw["negative_prompt_embeds"] = wan_embeds(pipe, neg)
    return kw


def generate(name, pipe, steps: int = 6, seed: int = 0, **overrides):
    kw = pipe_kwargs(name, pipe, **overrides)
    kw.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="latent")
    with torch.no_grad():
        out = pipe(**kw)
    return out.frames if hasattr(out, "frames") else out.images
