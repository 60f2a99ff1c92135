"""Tiny offline builders for LTX2Pipeline, SkyReelsV2Pipeline, WanVACEPipeline/Hunyuan, Kandinsky5T2VPipeline.

Random weights, 2-layer transformers, hidden <= 64. Text encoders are left out (None) where the pipeline
accepts prompt embeddings directly: every generate() passes prompt_embeds (and masks / negatives).
Each builder is deterministic given its seed.
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
import pipelines as P  # noqa: E402

L = 8  # text tokens


def _seeded(build):
    return P._seeded(build)


def _emb(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- LTX-2 -------------------------------------------------------------------------------
@_seeded
def ltx2():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline
    from diffusers.models.autoencoders.autoencoder_kl_ltx2 import AutoencoderKLLTX2Video
    from diffusers.models.autoencoders.autoencoder_kl_ltx2_audio import AutoencoderKLLTX2Audio
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16).eval()
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=4,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=4).eval()
    # only its config / latents_mean / latents_std / compression ratios are read with output_type="latent"
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8,), down_block_types=("LTX2VideoDownBlock3D",),
        decoder_block_out_channels=(8,), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
        downsample_type=("spatiotemporal",), upsample_type=("spatiotemporal",), upsample_residual=(True,),
        upsample_factor=(2,), patch_size=2, spatial_compression_ratio=8, temporal_compression_ratio=4).eval()
    audio_vae = AutoencoderKLLTX2Audio(base_channels=8, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                       latent_channels=2, mel_bins=16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1)
    return LTX2Pipeline(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=None, tokenizer=None,
                        connectors=connectors, transformer=transformer, vocoder=None)


def ltx2_text(seed=100, batch=2):
    emb = _emb((batch, L, 32), seed)  # [B, L, caption_channels * text_proj_in_factor]
    mask = torch.ones(batch, L, dtype=torch.long)
    mask[1, : L // 2] = 0  # left padding (Gemma's side)
    return emb, mask


# -- SkyReels-V2 ---------------------------------------------------------------------------
def _wan_vae():
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                            scale_factor_temporal=2, scale_factor_spatial=4).eval()


@_seeded
def skyreels2():
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=_wan_vae(),
                              scheduler=scheduler)


# -- Wan VACE ------------------------------------------------------------------------------
@_seeded
def wanvace():
    from diffusers import UniPCMultistepScheduler, WanVACEPipeline, WanVACETransformer3DModel

    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
        vace_in_channels=4 * 2 + 4 * 4).eval()  # (inactive + reactive latents) + mask (spatial 4x4 folded)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanVACEPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=_wan_vae(),
                           scheduler=scheduler)


# residual bases by input name, per output, for blocks the shape rule cannot pair (None: cached whole).
# WanVACETransformerBlock returns (conditioning_states = proj_after(control), control); block 0 starts with
# control = proj_in(control) + hidden_states, so its control output is a residual of hidden_states.
BASE_OVERRIDE = {"wanvace": {"vace_blocks.0": [None, "hidden_states"], "vace_blocks.1": [None, "control_hidden_states"]}}

BUILDERS = {"ltx2": ltx2, "skyreels2": skyreels2, "wanvace": wanvace}


# -- per-pipeline call arguments -------------------------------------------------------------
def _sky_text(seed, batch=2):
    return _emb((batch, L, 16), seed)


ONE_CALL_LTX2 = dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0,
                     modality_scale=1.0, audio_modality_scale=1.0)


def defaults(name: str) -> dict:
    if name == "ltx2":
        emb, mask = ltx2_text(100)
        return dict(prompt_embeds=emb, prompt_attention_mask=mask, height=32, width=32, num_frames=9,
                    frame_rate=24.0, **ONE_CALL_LTX2)
    if name == "skyreels2":
        return dict(prompt_embeds=_sky_text(100), guidance_scale=1.0, height=16, width=16, num_frames=9)
    if name == "wanvace":
        return dict(prompt_embeds=_sky_text(100, 1), guidance_scale=1.0, height=16, width=16, num_frames=9)
    if name == "kandinsky5":
        return _k5_defaults()
    raise KeyError(name)


def two_calls(name: str) -> dict | None:
    """The pipeline's own way of calling the denoiser more than once per step."""
    if name == "ltx2":  # modality-isolation guidance: a second call with isolate_modalities=True
        return dict(modality_scale=3.0, audio_modality_scale=3.0)
    if name == "skyreels2":
        return dict(guidance_scale=6.0, negative_prompt_embeds=_sky_text(200))
    if name == "wanvace":
        return dict(guidance_scale=5.0, negative_prompt_embeds=_sky_text(200, 1))
    if name == "kandinsky5":
        return _k5_two()
    return None


def more_calls(name: str) -> dict | None:
    """LTX-2 with everything on: batched CFG (batch 4) + STG at block 1 + modality isolation: 3 calls per step."""
    if name == "ltx2":
        neg, nmask = ltx2_text(200)
        return dict(guidance_scale=3.0, audio_guidance_scale=7.0, negative_prompt_embeds=neg,
                    negative_prompt_attention_mask=nmask, stg_scale=1.0, audio_stg_scale=1.0,
                    spatio_temporal_guidance_blocks=[1], modality_scale=3.0, audio_modality_scale=3.0)
    return None


def generate(name, pipe, steps: int = 6, seed: int = 0, **overrides) -> list:
    """Latent outputs as a list of tensors (LTX-2: [video, audio])."""
    kw = defaults(name)
    kw.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="latent")
    kw.update(overrides)
    with torch.no_grad():
        out = pipe(**kw)
    if name == "ltx2":
        return [out.frames, out.audio]
    return [out.frames]


# -- Kandinsky 5 T2V ---------------------------------------------------------------------------
@_seeded
def kandinsky5():
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel

    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)).eval()
    # its modulation layers are zero-initialised (gates 0: every block is the identity, caching would change
    # nothing); give every all-zero parameter random values so that blocks really act
    with torch.no_grad():
        for q in transformer.parameters():
            if q.abs().max() == 0:
                q.normal_(0.0, 0.2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    # vae=None: temporal factor 4, spatial 8 (the pipeline's defaults); output_type="latent" never decodes
    return Kandinsky5T2VPipeline(transformer=transformer, vae=None, text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None, scheduler=scheduler)


def _k5_text(seed):
    return dict(qwen=_emb((1, L, 16), seed), clip=_emb((1, 16), seed + 1),
                cu=torch.tensor([0, L], dtype=torch.int32))


def _k5_defaults():
    t = _k5_text(100)
    return dict(prompt_embeds_qwen=t["qwen"], prompt_embeds_clip=t["clip"], prompt_cu_seqlens=t["cu"],
                guidance_scale=1.0, height=32, width=32, num_frames=9)


def _k5_two():
    t = _k5_text(200)
    return dict(guidance_scale=5.0, negative_prompt_embeds_qwen=t["qwen"], negative_prompt_embeds_clip=t["clip"],
                negative_prompt_cu_seqlens=t["cu"])


BUILDERS["kandinsky5"] = kandinsky5


def blocks_of(name, pipe):
    """The blocks the reference caches (and the plans name): tests' default_blocks, except Kandinsky 5, whose
    per-layer stack is `visual_transformer_blocks` (its `text_transformer_blocks` never see the latent)."""
    if name == "kandinsky5":
        return [("transformer", f"visual_transformer_blocks.{i}") for i in range(len(pipe.transformer.visual_transformer_blocks))]
    return P.default_blocks(pipe)
