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

__all__ = ["MODELS", "ZooSpec", "build", "spec_of", "step_inputs"]


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


def _sdxl(latent: int, scale: int = 1):
    # SDXL's UNet config (2.6B parameters); scale > 1 divides the widths for tests
    # that need its structure (text_time conditioning, 1/2/10 transformer layers).
    w = lambda c: c // scale  # noqa: E731
    model = _unet(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w(320), w(640), w(1280)),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20) if scale == 1 else (1, 2, 4),
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


MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, dict]]] = {
    "unet-tiny": _unet_tiny,
    "sd15": _sd15,
    "sdxl": _sdxl,
    "sdxl-small": lambda latent: _sdxl(latent, scale=16),
    "pixart": _pixart,
    "pixart-alpha": _pixart_alpha,
    "sd3": _sd3,
    "flux": _flux,
    "dit": _dit,
}


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
    cond_g = torch.Generator().manual_seed(seed)  # conditions stay fixed over a trajectory
    t = torch.tensor(int(999 - step * (1000 // max(num_steps, 1))) % 1000)

    def rand(shape, gen=cond_g):
        return torch.randn((batch, *shape), generator=gen)

    def build_extra(spec: Any) -> Any:
        if isinstance(spec, Mapping):
            return {k: build_extra(v) for k, v in spec.items()}
        if spec is None:
            return None
        return rand(spec)

    kwargs = {k: build_extra(v) for k, v in extra.items()}
    if name == "flux":
        tokens = latent * latent
        x = torch.randn(batch, tokens, model.config.in_channels, generator=g)
        txt = kwargs["encoder_hidden_states"].shape[1]
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(latent).float(), torch.arange(latent).float(), indexing="ij"), -1)
        kwargs.update(timestep=t.float().expand(batch) / 1000, img_ids=img_ids.reshape(-1, 3),
                      txt_ids=torch.zeros(txt, 3), return_dict=False)
        return (x,), kwargs
    x = torch.randn(batch, model.config.in_channels, latent, latent, generator=g)
    if name == "dit":
        kwargs.update(timestep=t.expand(batch), class_labels=torch.arange(batch) % 10, return_dict=False)
        return (x,), kwargs
    if name in ("pixart", "pixart-alpha", "sd3"):
        kwargs.update(timestep=t.expand(batch), return_dict=False)
        return (x,), kwargs
    kwargs["return_dict"] = False
    return (x, t), kwargs
