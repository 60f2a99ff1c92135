"""Random-weight denoisers built from configs, with example inputs (nothing downloaded).

They prove capture, block discovery, exactness and speed on real architectures; with
random weights their block changes mean nothing, so they prove nothing about quality.

Example:
    >>> model, args, kwargs = build("unet-tiny", seed=0)
    >>> tuple(model(*args, **kwargs)[0].shape)
    (2, 4, 8, 8)
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from bcc.errors import BccError, ErrorCode

__all__ = ["FRAMES", "MODELS", "ZooSpec", "build", "call_inputs", "conditions", "spec_of", "step_inputs"]


def _unet(**config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _unet_tiny(latent: int):
    model = _unet(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )
    return model, {"encoder_hidden_states": (3, 32)}


def _sd15(latent: int):
    # Stable Diffusion 1.5's UNet config (860M parameters).
    model = _unet(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    return model, {"encoder_hidden_states": (77, 768)}


def _sdxl(latent: int, scale: int = 1, layers: tuple[int, int, int] = (1, 2, 10)):
    # SDXL's UNet config (2.6B parameters); scale > 1 divides the widths for tests
    # that need its structure (text_time conditioning, transformer layers per level).
    w = lambda c: c // scale  # noqa: E731
    model = _unet(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w(320), w(640), w(1280)),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=layers, attention_head_dim=(5, 10, 20) if scale == 1 else (1, 2, 4),
        cross_attention_dim=w(2048), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=w(256), projection_class_embeddings_input_dim=w(256) * 6 + w(1280),
        norm_num_groups=32 // scale if scale <= 32 else 1,
    )
    extra = {
        "encoder_hidden_states": (77, w(2048)),
        "added_cond_kwargs": {"text_embeds": (w(1280),), "time_ids": (6,)},
    }
    return model, extra


def _pixart(latent: int):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=24,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return model, {"encoder_hidden_states": (5, 24), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _pixart_alpha(latent: int):
    # PixArt-alpha 512's transformer config (28 blocks, width 1152, ~600M parameters).
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
        num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return model, {"encoder_hidden_states": (120, 4096), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3(latent: int):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
        pooled_projection_dim=12, pos_embed_max_size=32,
    )
    return model, {"encoder_hidden_states": (5, 24), "pooled_projections": (12,)}


def _flux(latent: int):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 4, 8),
    )
    return model, {"encoder_hidden_states": (5, 24), "pooled_projections": (12,)}


def _dit(latent: int):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=latent, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )
    return model, {}


def _wan(latent: int, *, width: int = 16, heads: int = 2, layers: int = 2, text: int = 16):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
        out_channels=4, text_dim=text, freq_dim=16, ffn_dim=2 * width, num_layers=layers, rope_max_seq_len=32,
    )
    return model, {"encoder_hidden_states": (5, text)}


def _hunyuan_video(latent: int, *, width: int = 16, heads: int = 2, layers: int = 1, text: int = 16):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=width // heads,
        num_layers=layers, num_single_layers=layers, num_refiner_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=text, pooled_projection_dim=8, rope_axes_dim=(2, 2, width // heads - 4), guidance_embeds=True,
    )
    return model, {"encoder_hidden_states": (5, text), "pooled_projections": (8,)}


def _svd(latent: int):
    from diffusers import UNetSpatioTemporalConditionModel

    model = UNetSpatioTemporalConditionModel(
        sample_size=latent, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",), up_block_types=("CrossAttnUpBlockSpatioTemporal",),
        block_out_channels=(32,), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2,), num_frames=2,
    )
    return model, {"encoder_hidden_states": (1, 32)}


def _mochi(latent: int):
    from diffusers import MochiTransformer3DModel

    # The caption pooler has 8 heads: text_embed_dim must divide by 8.
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=8,
    )
    return model, {"encoder_hidden_states": (5, 16)}


def _hidream(latent: int, experts: int = 0):
    from diffusers import HiDreamImageTransformer2DModel

    # experts=0: the dense feed-forward; routed experts choose tokens by value (not capturable).
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 12], text_emb_dim=12, num_routed_experts=experts,
        num_activated_experts=min(2, experts), axes_dims_rope=(4, 2, 2), max_resolution=(latent, latent),
        llama_layers=[0, 1],
    )
    return model, {"encoder_hidden_states_t5": (5, 16), "pooled_embeds": (12,)}


def _lumina2(latent: int):
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4), axes_lens=(32, 32, 32),
        cap_feat_dim=16,
    )
    return model, {"encoder_hidden_states": (5, 16)}


def _sana(latent: int):
    from diffusers import SanaTransformer2DModel

    # Linear self-attention and a depthwise 3x3 conv in the feed-forward (Mix-FFN).
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        mlp_ratio=2.5, sample_size=latent, patch_size=1,
    )
    return model, {"encoder_hidden_states": (5, 32)}


def _z_image(latent: int):
    from diffusers import ZImageTransformer2DModel

    # The latent is a list of per-sample [C, F, H, W] tensors; a refiner on each stream
    # before the main layers (the caption's reads no latent: not a block).
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
    )
    return model, {"cap_feats": (5, 32)}


def _cosmos(latent: int):
    from diffusers import CosmosTransformer3DModel

    # Each block adds a learned position embedding to its hidden states first: two inputs on
    # its identity path. concat_padding_mask=False: the padding-mask path needs torchvision.
    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 2 * latent, 2 * latent), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable",
    )
    return model, {"encoder_hidden_states": (5, 16)}


MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, dict]]] = {
    "unet-tiny": _unet_tiny,
    "sd15": _sd15,
    "sdxl": _sdxl,
    # 1/2/3 layers instead of 1/2/10: the structure (a different depth per level) at a
    # third of the transformer blocks, which is most of an inductor compile.
    "sdxl-small": lambda latent: _sdxl(latent, scale=16, layers=(1, 2, 3)),
    "pixart": _pixart,
    "pixart-alpha": _pixart_alpha,
    "sd3": _sd3,
    "flux": _flux,
    "dit": _dit,
    # Video and the newest DiTs (tiny: tests; "-bench": the speed benchmark's
    # attention-dominated sizes, 5 latent frames).
    "wan": _wan,
    "wan-bench": lambda latent: _wan(latent, width=256, heads=4, layers=6, text=64),
    "hunyuan-video": _hunyuan_video,
    "hunyuan-video-bench": lambda latent: _hunyuan_video(latent, width=256, heads=4, layers=3, text=64),
    "svd": _svd,
    "mochi": _mochi,
    "hidream": _hidream,
    "hidream-moe": lambda latent: _hidream(latent, experts=2),
    "lumina2": _lumina2,
    "sana": _sana,
    "z-image": _z_image,
    "cosmos": _cosmos,
}

#: Latent frames of the video models (their latent is ``[B, C, F, H, W]``; SVD's ``[B, F, C, H, W]``).
FRAMES = {"wan": 2, "hunyuan-video": 2, "svd": 2, "mochi": 2, "wan-bench": 5, "hunyuan-video-bench": 5, "z-image": 1,
          "cosmos": 2}


def _read_only(value: Any) -> Any:
    # The spec is shared by every trajectory built from the model: nobody may edit it.
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _read_only(v) for k, v in value.items()})
    return value


@dataclass(frozen=True)
class ZooSpec:
    """What :func:`build` made a model from, so later steps' inputs can be made to match.

    Attributes:
        name: the :data:`MODELS` key.
        extra: the model's conditioning inputs as shapes without the batch (read-only),
            e.g. ``{"encoder_hidden_states": (3, 32)}``.
        latent: latent height and width (Flux: tokens per side).
        batch: batch size.

    Example:
        >>> model, _, _ = build("unet-tiny")
        >>> spec = spec_of(model)
        >>> spec.name, spec.latent, spec.batch, dict(spec.extra)
        ('unet-tiny', 8, 2, {'encoder_hidden_states': (3, 32)})
        >>> args, kwargs = spec.step_inputs(model, step=3, num_steps=5)
        >>> tuple(args[0].shape), int(args[1])
        ((2, 4, 8, 8), 399)
    """

    name: str
    extra: Mapping[str, Any]
    latent: int
    batch: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", _read_only(self.extra))

    def __reduce__(self):  # a read-only mapping does not pickle (nor deepcopy): rebuild from a dict
        return ZooSpec, (self.name, _plain(self.extra), self.latent, self.batch)

    def step_inputs(self, model: torch.nn.Module, *, step: int, seed: int = 0, num_steps: int = 20) -> tuple[tuple, dict]:
        """:func:`step_inputs` for this model at its own latent size and batch."""
        return step_inputs(self.name, model, self.extra, latent=self.latent, batch=self.batch, step=step, seed=seed,
                           num_steps=num_steps)


def _plain(value: Any) -> Any:
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def spec_of(model: torch.nn.Module) -> ZooSpec:
    """The :class:`ZooSpec` of a model made by :func:`build`.

    Example:
        >>> spec_of(torch.nn.Linear(1, 1))
        Traceback (most recent call last):
        ...
        bcc.errors.BccError: [BCC001] Linear was not built by bcc.tools.zoo.build, so it has no zoo spec; build it with zoo.build(name).
    """
    spec = getattr(model, "_bcc_zoo", None)
    if not isinstance(spec, ZooSpec):
        raise BccError(ErrorCode.CONFIG_INVALID, f"{type(model).__name__} was not built by bcc.tools.zoo.build, so it "
                       "has no zoo spec; build it with zoo.build(name).")
    return spec


def build(name: str, *, latent: int = 8, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, tuple, dict]:
    """Build model ``name`` with random weights and example inputs for one step.

    Args:
        name: one of :data:`MODELS`.
        latent: latent height and width (Flux: tokens per side).
        batch: batch size (2 = one prompt with classifier-free guidance).
        seed: seeds both the weights and the inputs.

    Returns:
        ``(model, args, kwargs)`` with ``model`` in eval mode; :func:`spec_of` gives
        what it was built from.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(seed)
    model, extra = MODELS[name](latent)
    model.eval()
    args, kwargs = step_inputs(name, model, extra, latent=latent, batch=batch, step=0, seed=seed)
    model._bcc_zoo = ZooSpec(name, extra, latent, batch)
    return model, args, kwargs


def step_inputs(name: str, model: torch.nn.Module, extra: Mapping[str, Any], *, latent: int, batch: int, step: int, seed: int = 0,
                num_steps: int = 20) -> tuple[tuple, dict]:
    """Inputs for sampling step ``step``: fresh latents, a decreasing timestep, fixed conditions."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    t = torch.tensor(int(999 - step * (1000 // max(num_steps, 1))) % 1000)
    kwargs = _conditions(name, extra, batch, seed)
    x = torch.randn(_latent_shape(name, model, batch, latent), generator=g)
    return _call_inputs(name, x, t, kwargs, latent)


def conditions(model: torch.nn.Module, *, seed: int = 0) -> dict[str, Any]:
    """The fixed conditioning of zoo ``model`` (text states, pooled embeddings...), for :func:`call_inputs`.

    Example:
        >>> model, _, _ = build("unet-tiny")
        >>> tuple(conditions(model)["encoder_hidden_states"].shape)
        (2, 3, 32)
    """
    spec = spec_of(model)
    return _conditions(spec.name, spec.extra, spec.batch, seed)


def _conditions(name: str, extra: Mapping[str, Any], batch: int, seed: int) -> dict[str, Any]:
    cond_g = torch.Generator().manual_seed(seed)  # conditions stay fixed over a trajectory

    def build_extra(spec: Any) -> Any:
        if isinstance(spec, Mapping):
            return {k: build_extra(v) for k, v in spec.items()}
        return None if spec is None else torch.randn((batch, *spec), generator=cond_g)

    kwargs = {k: build_extra(v) for k, v in extra.items()}
    if name in ("hidream", "hidream-moe"):
        # The Llama-3 states come layer-first: [layers, B, S, D].
        kwargs["encoder_hidden_states_llama3"] = torch.randn((2, batch, 3, 12), generator=cond_g)
    return kwargs


def _latent_shape(name: str, model: torch.nn.Module, batch: int, latent: int) -> tuple[int, ...]:
    if name == "flux":
        return (batch, latent * latent, model.config.in_channels)
    if name == "svd":
        return (batch, FRAMES[name], model.config.in_channels, latent, latent)
    if name in FRAMES:
        return (batch, model.config.in_channels, FRAMES[name], latent, latent)
    return (batch, model.config.in_channels, latent, latent)


def call_inputs(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: Mapping[str, Any]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` calling zoo ``model`` on latent ``x`` at timestep ``t`` (0-d) with
    :func:`conditions` (as a sampling loop calls it).

    Example:
        >>> model, args, _ = build("dit")
        >>> a, k = call_inputs(model, args[0], torch.tensor(500), conditions(model))
        >>> k["timestep"].tolist()
        [500, 500]
    """
    spec = spec_of(model)
    return _call_inputs(spec.name, x, t, dict(conditions), spec.latent)


def _call_inputs(name: str, x: torch.Tensor, t: torch.Tensor, kwargs: dict, latent: int) -> tuple[tuple, dict]:
    batch = x.shape[0]
    kwargs = dict(kwargs, return_dict=False)
    if name == "flux":
        txt = kwargs["encoder_hidden_states"].shape[1]
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(latent).float(), torch.arange(latent).float(), indexing="ij"), -1)
        kwargs.update(timestep=t.float().expand(batch) / 1000, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3))
        return (x,), kwargs
    if name == "dit":
        kwargs.update(timestep=t.expand(batch), class_labels=torch.arange(batch) % 10)
        return (x,), kwargs
    if name in ("pixart", "pixart-alpha", "sd3"):
        kwargs.update(timestep=t.expand(batch))
        return (x,), kwargs
    if name in ("wan", "wan-bench"):
        return (x, t.expand(batch), kwargs.pop("encoder_hidden_states")), kwargs
    if name in ("hunyuan-video", "hunyuan-video-bench"):
        # Pipelines pass the prompt mask as float; guidance is the distilled-CFG scale x 1000.
        texts = kwargs["encoder_hidden_states"].shape[1]
        kwargs.update(encoder_attention_mask=torch.ones(batch, texts), guidance=torch.full((batch,), 6000.0))
        return (x, t.expand(batch)), kwargs
    if name == "svd":
        # added_time_ids: fps, motion bucket, noise augmentation (SVD's pipeline order).
        kwargs.update(added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]).repeat(batch, 1))
        return (x, t.float()), kwargs
    if name == "mochi":
        texts = kwargs["encoder_hidden_states"].shape[1]
        kwargs.update(timestep=t.expand(batch), encoder_attention_mask=torch.ones(batch, texts, dtype=torch.bool))
        return (x,), kwargs
    if name in ("hidream", "hidream-moe"):
        kwargs.update(timesteps=t.expand(batch))
        return (x,), kwargs
    if name == "cosmos":
        kwargs.update(timestep=t.float().expand(batch) / 1000, fps=30)
        return (x,), kwargs
    if name == "sana":
        texts = kwargs["encoder_hidden_states"].shape[1]
        kwargs.update(timestep=t.float().expand(batch), encoder_attention_mask=torch.ones(batch, texts))
        return (x,), kwargs
    if name == "z-image":
        # Per-sample lists; the timestep runs from 0 (noise) to 1, as the pipeline passes it.
        caps = list(kwargs.pop("cap_feats").unbind(0))
        return (list(x.unbind(0)), (1000 - t.float().expand(batch)) / 1000, caps), kwargs
    if name == "lumina2":
        texts = kwargs["encoder_hidden_states"].shape[1]
        kwargs.update(encoder_attention_mask=torch.ones(batch, texts, dtype=torch.bool))
        return (x, t.float().expand(batch) / 1000, kwargs.pop("encoder_hidden_states")), kwargs
    return (x, t), kwargs
