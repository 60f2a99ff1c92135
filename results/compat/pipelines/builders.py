"""Tiny offline builders for newer diffusers pipelines (Chroma, QwenImage, Sana, LTX, CogVideoX).

Random weights, 2-layer transformers, hidden <= 64, offline character-level tokenizers (from
tests/pipelines.py where possible). Each builder is deterministic given its seed.
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
import pipelines as P  # noqa: E402

TEXT_LEN = P.TEXT_LEN


def _seeded(build):
    return P._seeded(build)


# -- Chroma ------------------------------------------------------------------------------
@_seeded
def chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = P.t5_tokenizer()
    text_encoder = P._t5_encoder(tokenizer, d_model=32)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1).eval()
    vae = P._vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                 use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


# -- QwenImage ---------------------------------------------------------------------------
def qwen_tokenizer():
    """Character-level fast tokenizer with Qwen's chat special tokens (pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>",
                                eos_token="<|im_end|>", model_max_length=2048)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return t


def qwen_text_encoder(tokenizer, hidden: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=len(tokenizer) + 10, video_token_id=len(tokenizer) + 11,
        vision_start_token_id=len(tokenizer) + 12, vision_end_token_id=len(tokenizer) + 13,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@_seeded
def qwen(text_encoder: bool = True):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    tokenizer = qwen_tokenizer() if text_encoder else None
    encoder = qwen_text_encoder(tokenizer) if text_encoder else None
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                             transformer=transformer)


# -- Sana --------------------------------------------------------------------------------
def gemma_encoder(tokenizer, hidden: int = 32):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=64)
    return Gemma2Model(config).eval()


@_seeded
def sana():
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = P.t5_tokenizer()
    text_encoder = gemma_encoder(tokenizer)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        mlp_ratio=2.5, sample_size=8, patch_size=1).eval()
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8,
                        encoder_block_types=("ResBlock",) * 3, decoder_block_types=("ResBlock",) * 3,
                        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


# -- LTX ---------------------------------------------------------------------------------
@_seeded
def ltx():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    tokenizer = P.t5_tokenizer()
    text_encoder = P._t5_encoder(tokenizer, d_model=16)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                             cross_attention_dim=32, num_layers=2, caption_channels=16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096)
    # vae=None: output_type="latent" never decodes; compression ratios default to 32 (spatial), 8 (temporal)
    return LTXPipeline(scheduler=scheduler, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer)


# -- CogVideoX ---------------------------------------------------------------------------
@_seeded
def cogvideox():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tokenizer = P.t5_tokenizer()
    text_encoder = P._t5_encoder(tokenizer, d_model=16)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True).eval()
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
                                       set_alpha_to_one=True, snr_shift_scale=1.0)
    # vae=None: spatial factor 8, temporal 4, scaling 0.7 (the pipeline's defaults without a VAE)
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=transformer,
                             scheduler=scheduler)


BUILDERS = {"chroma": chroma, "qwen": qwen, "sana": sana, "ltx": ltx, "cogvideox": cogvideox}

PROMPTS = list(P.PROMPTS)
NEGATIVE = list(P.NEGATIVE)


def defaults(name: str) -> dict:
    kw: dict = {"prompt": list(PROMPTS)}
    if name == "chroma":  # guidance_scale > 1: a second (negative) transformer call per step
        kw.update(guidance_scale=1.0, height=16, width=16, max_sequence_length=TEXT_LEN)
    elif name == "qwen":
        kw.update(height=16, width=16, max_sequence_length=TEXT_LEN, true_cfg_scale=1.0)
    elif name == "sana":
        kw.update(guidance_scale=4.5, height=32, width=32, max_sequence_length=TEXT_LEN,
                  use_resolution_binning=False, clean_caption=False, complex_human_instruction=None)
    elif name == "ltx":
        kw.update(guidance_scale=3.0, height=64, width=64, num_frames=9, max_sequence_length=TEXT_LEN)
    elif name == "cogvideox":
        kw.update(guidance_scale=6.0, height=64, width=64, num_frames=9, max_sequence_length=TEXT_LEN)
    return kw


TWO_CALLS = {  # the pipeline's own way of calling the denoiser twice per step
    "chroma": dict(guidance_scale=4.0, negative_prompt=NEGATIVE),
    "qwen": dict(true_cfg_scale=4.0, negative_prompt=NEGATIVE),
}


def generate(name, pipe, steps: int = 6, seed: int = 0, **overrides):
    kw = defaults(name)
    kw.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="latent")
    kw.update(overrides)
    with torch.no_grad():
        out = pipe(**kw)
    return out.frames if hasattr(out, "frames") else out.images
