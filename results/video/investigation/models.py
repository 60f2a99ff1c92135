"""Tiny random-weight configs of the issue-18 models (diffusers 0.42.1), each runs in seconds on CPU.

    model, args, kwargs = build("wan")
    out = model(*args, **kwargs)

Every build seeds torch with 0, puts the model in eval mode, and returns inputs for one
denoising step with batch 2 (one prompt with classifier-free guidance), return_dict=False.
``step_inputs(name, model, step)`` gives fresh latents and a decreasing timestep for step
``step`` (conditions fixed), for multi-step trajectories.
"""
from __future__ import annotations

import torch

B = 2  # batch (CFG halves)
NAMES = ("wan", "hunyuan", "svd", "hidream", "hidream-dense", "lumina2", "mochi")


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def _wan():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )

    def inputs(step, g, cg):
        x = _rand(B, 4, 2, 8, 8, g=g)                               # B, C, F, H, W
        t = torch.full((B,), 999 - 50 * step, dtype=torch.long)
        return (x, t, _rand(B, 5, 16, g=cg)), {"return_dict": False}
    return m, inputs


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=True,
    )

    def inputs(step, g, cg):
        x = _rand(B, 4, 2, 8, 8, g=g)
        t = torch.full((B,), 999 - 50 * step, dtype=torch.long)
        kw = {
            "encoder_hidden_states": _rand(B, 5, 16, g=cg),
            "encoder_attention_mask": torch.ones(B, 5),             # fp32 mask, as pipelines pass it
            "pooled_projections": _rand(B, 8, g=cg),
            "guidance": torch.full((B,), 6000.0),
            "return_dict": False,
        }
        return (x, t), kw
    return m, inputs


def _svd():
    from diffusers import UNetSpatioTemporalConditionModel

    m = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=2,
    )

    def inputs(step, g, cg):
        x = _rand(B, 2, 8, 8, 8, g=g)                               # B, F, C, H, W
        t = torch.tensor(float(999 - 50 * step))
        added = torch.tensor([[6.0, 127.0, 0.02]]).repeat(B, 1)   # fps, motion bucket, noise aug
        return (x, t), {"encoder_hidden_states": _rand(B, 1, 32, g=cg), "added_time_ids": added,
                        "return_dict": False}
    return m, inputs


def _hidream(experts: int):
    from diffusers import HiDreamImageTransformer2DModel

    m = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 12], text_emb_dim=12, num_routed_experts=experts,
        num_activated_experts=min(2, experts), axes_dims_rope=(4, 2, 2), max_resolution=(8, 8),
        llama_layers=[0, 1],
    )

    def inputs(step, g, cg):
        x = _rand(B, 4, 8, 8, g=g)
        t = torch.full((B,), 999 - 50 * step, dtype=torch.long)
        kw = {
            "timesteps": t,
            "encoder_hidden_states_t5": _rand(B, 5, 16, g=cg),
            "encoder_hidden_states_llama3": _rand(2, B, 3, 12, g=cg),  # layers, B, S, D
            "pooled_embeds": _rand(B, 12, g=cg),
            "return_dict": False,
        }
        return (x,), kw
    return m, inputs


def _lumina2():
    from diffusers import Lumina2Transformer2DModel

    m = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4), axes_lens=(32, 32, 32),
        cap_feat_dim=16,
    )

    def inputs(step, g, cg):
        x = _rand(B, 4, 8, 8, g=g)
        t = torch.full((B,), (999 - 50 * step) / 1000.0)
        mask = torch.ones(B, 5, dtype=torch.bool)
        return (x, t, _rand(B, 5, 16, g=cg), mask), {"return_dict": False}
    return m, inputs


def _mochi():
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=8,
    )

    def inputs(step, g, cg):
        x = _rand(B, 4, 2, 8, 8, g=g)
        t = torch.full((B,), 999 - 50 * step, dtype=torch.long)
        kw = {"encoder_hidden_states": _rand(B, 5, 16, g=cg), "timestep": t,
              "encoder_attention_mask": torch.ones(B, 5, dtype=torch.bool), "return_dict": False}
        return (x,), kw
    return m, inputs


_BUILDERS = {
    "wan": _wan, "hunyuan": _hunyuan, "svd": _svd, "hidream": lambda: _hidream(2),
    "hidream-dense": lambda: _hidream(0), "lumina2": _lumina2, "mochi": _mochi,
}


def step_inputs(name: str, model, step: int, seed: int = 0):
    if name.startswith("zoo:"):
        from bcc.tools import zoo
        zname, extra, latent, batch = model._bcc_zoo
        return zoo.step_inputs(zname, model, extra, latent=latent, batch=batch, step=step, seed=seed)
    g = torch.Generator().manual_seed(seed * 1000 + step)
    cg = torch.Generator().manual_seed(seed)
    return model._tiny_inputs(step, g, cg)


def build(name: str, seed: int = 0):
    """(model, args, kwargs) for step 0 of ``name`` (one of NAMES, or "zoo:<bcc.tools.zoo name>")."""
    if name.startswith("zoo:"):
        from bcc.tools import zoo
        return zoo.build(name[4:], seed=seed)
    torch.manual_seed(seed)
    model, inputs = _BUILDERS[name]()
    model.eval()
    model._tiny_inputs = inputs
    args, kwargs = step_inputs(name, model, 0, seed)
    return model, args, kwargs


if __name__ == "__main__":
    import sys
    import time

    for name in sys.argv[1:] or NAMES:
        t0 = time.time()
        m, a, k = build(name)
        with torch.no_grad():
            out = m(*a, **k)[0]
        print(f"{name}: out {tuple(out.shape)} params {sum(p.numel() for p in m.parameters())} "
              f"{time.time() - t0:.1f}s")
